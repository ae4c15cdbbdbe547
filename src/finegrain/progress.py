"""Progress bars and status lines of every long job, in one place: bars are drawn only on a terminal (a log file or
CI gets no carriage-return frames: a 2-epoch train log held 75 of them in 8 lines), status lines (one per epoch, the
recipe's decisions) are plain lines everywhere, and ``--quiet`` leaves only errors. Warnings and errors do not come
through here: they go to stderr as they always did.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

logger = logging.getLogger("finegrain")
_state = {"quiet": False}


def set_verbosity(quiet: bool = False, verbose: bool = False) -> None:
    """``--quiet``: no bars, no status lines; ``-v``: the library's debug log on stderr too."""
    _state["quiet"] = quiet
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    if verbose and not logger.handlers:
        logger.addHandler(logging.StreamHandler())


def progress_bar(iterable=None, disable: bool = False, **kwargs) -> tqdm:
    """tqdm, drawn only where stderr is a terminal (tqdm's ``disable=None``) and never with ``--quiet``."""
    return tqdm(iterable, disable=True if disable or _state["quiet"] else None, **kwargs)


def say(message: str, stderr: bool = False) -> None:
    """One status line on stdout (``stderr``: there, beside a command whose stdout is data, e.g. ``--json``), above
    any bar; silent with ``--quiet``."""
    if not _state["quiet"]:
        tqdm.write(message, file=sys.stderr if stderr else None)
