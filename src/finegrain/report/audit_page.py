"""The label audit's page: one self-contained HTML file of the suspicious images, each with its given and
suggested label, most suspicious first (``finegrain data audit``; the CSV beside it has the same rows)."""

from __future__ import annotations

import html
from pathlib import Path

from finegrain.atomic import write_text
from finegrain.data import DatasetIndex
from finegrain.engine.audit import LabelIssue
from finegrain.report.html import thumbnail_uri

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} figure{{display:inline-block;margin:8px;width:230px;
vertical-align:top}} img{{max-width:220px;max-height:220px}} figcaption{{font-size:13px}} .given{{color:#c92a2a}}
.suggested{{color:#2b8a3e}}</style></head><body><h1>{title}</h1><p>{summary}</p>{figures}</body></html>"""


def write_audit_page(issues: list[LabelIssue], index: DatasetIndex, summary: dict, out: Path, limit: int = 200) -> Path:
    """The first ``limit`` issues as thumbnails (the CSV lists them all)."""
    esc = html.escape
    figures = [
        f'<figure><img src="{thumbnail_uri(e.sample)}"><figcaption>#{rank} {esc(index.relpath(e.sample))}<br>'
        f'<span class="given">given: {esc(e.given)} ({100 * e.p_given:.0f}%)</span><br>'
        f'<span class="suggested">suggested: {esc(e.suggested)} ({100 * e.p_suggested:.0f}%)</span></figcaption>'
        "</figure>"
        for rank, e in enumerate(issues[:limit], 1)
    ]
    text = (f"{summary['flagged']} of {summary['images']} labelled images look mislabelled (out-of-fold probe "
            f"top-1 {100 * summary['out_of_fold_top1']:.1f}%, {summary['folds']} folds). Nothing was changed: "
            "check each photo and fix its label in the data.")  # fmt: skip
    body = "\n".join(figures) or "<p>No suspicious labels.</p>"
    write_text(out, PAGE.format(title=esc(f"label audit: {index.root}"), summary=esc(text), figures=body), "utf-8")
    return out
