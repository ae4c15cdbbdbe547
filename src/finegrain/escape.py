"""User text (class names above all: they come from folder names and manifests) made safe for the format it is
written into, in one place. Class names like ``<script>alert(1)</script>`` went verbatim into MODEL_CARD.md, where a
Markdown renderer that passes HTML runs them, and a name like ``=HYPERLINK(...)`` is a formula to a spreadsheet
opening a CSV. HTML pages use :func:`html`; JSON and the web page's ``textContent`` need nothing.
"""

from __future__ import annotations

import html as _html
import re

#: characters that start a formula in spreadsheet programs (OWASP's CSV-injection list)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_MARKDOWN = re.compile(r"([\\`*_\[\]|#~])")


def html(text: str) -> str:
    return _html.escape(str(text), quote=True)


def markdown(text: str) -> str:
    """Shown as written by any Markdown renderer: HTML escaped, emphasis, links, code and table pipes backslashed."""
    return _MARKDOWN.sub(r"\\\1", html(text))


def csv_cell(value):
    """A cell a spreadsheet shows as text: a leading apostrophe where it would start a formula (numbers as they
    are); :func:`csv_value` reads it back."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_START) else value


def csv_value(cell: str) -> str:
    """The value :func:`csv_cell` wrote."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_START) else cell
