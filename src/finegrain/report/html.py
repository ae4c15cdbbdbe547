"""A self-contained HTML evaluation report: one file, every picture inlined, no external assets.

It answers the questions that come after the headline number: which classes fail, which pairs of classes the
model mixes up (with a photo of each side), and where it looked on the photos it got wrong.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch.nn as nn
from PIL import Image

from finegrain.atomic import write_text
from finegrain.data.loading import open_sample
from finegrain.data.records import DatasetIndex, Sample
from finegrain.explain import explain
from finegrain.extras import need
from finegrain.predict import Predictor
from finegrain.run_layout import RunDir


def _data_uri(picture: Image.Image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    picture.convert("RGB").save(buf, format=fmt, quality=85)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def thumbnail_uri(sample: Sample, side: int = 220) -> str:
    img = open_sample(sample)
    img.thumbnail((side, side))
    return _data_uri(img)


def confusion_picture(confmat: np.ndarray) -> str:
    """The row-normalised confusion matrix as a PNG data URI (log colour scale so rare confusions show)."""
    return f"data:image/png;base64,{base64.b64encode(confusion_png(confmat)).decode()}"


def confusion_png(confmat: np.ndarray) -> bytes:
    need("plots", "the confusion-matrix picture")
    """The row-normalised confusion matrix as PNG bytes (log colour scale so rare confusions show)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colors
    from matplotlib import pyplot as plt

    rows = confmat / np.maximum(confmat.sum(1, keepdims=True), 1)
    n = len(confmat)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    im = ax.imshow(rows + 1e-3, cmap="viridis", norm=colors.LogNorm(vmin=1e-3, vmax=1 + 1e-3), interpolation="nearest")
    ax.set_xlabel("predicted class (index)")
    ax.set_ylabel("true class (index)")
    ax.set_title(f"confusion matrix, {n} classes (row-normalised, log scale)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def confused_pairs(confmat: np.ndarray, k: int = 10) -> list[tuple[int, int, int]]:
    """The ``k`` largest off-diagonal counts as (true, predicted, count), largest first."""
    off = confmat.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:k]
    pairs = [(int(i), int(j), int(off[i, j])) for i, j in zip(*np.unravel_index(order, off.shape), strict=True)]
    return [p for p in pairs if p[2] > 0]


def heatmap_pictures(model: nn.Module, classes: Sequence[str], samples: Sequence[Sample]) -> list[Image.Image]:
    """The same pictures as ``finegrain explain`` (heat-map and, for RA-CNN, its boxes), 300 px."""
    if not samples:
        return []
    predictor = Predictor(model, classes, model.preprocess, next(model.parameters()).device)
    images = [open_sample(s) for s in samples]
    pictures = [e.overlay(img, predictor) for e, img in zip(explain(predictor, images), images, strict=True)]
    for picture in pictures:
        picture.thumbnail((300, 300))
    return pictures


def write_report(
    out: Path,
    model: nn.Module,
    index: DatasetIndex,
    samples: Sequence[Sample],
    predicted: Sequence[int],
    confidence: Sequence[float],
    confmat: np.ndarray,
    metrics: dict,
    pairs: int = 10,
    errors: int = 8,
) -> Path:
    classes = index.classes
    esc = html.escape
    support = confmat.sum(1)
    wrong_by_class = confmat - np.diag(np.diag(confmat))

    rows = []
    for c, name in enumerate(classes):
        if support[c] == 0:
            continue
        worst = int(wrong_by_class[c].argmax())
        confused = f"{esc(classes[worst])} ({wrong_by_class[c, worst]})" if wrong_by_class[c, worst] else "-"
        rows.append(
            f"<tr><td>{c}</td><td>{esc(name)}</td><td>{support[c]}</td><td>{confmat[c, c]}</td>"
            f"<td>{100 * confmat[c, c] / support[c]:.1f}</td><td>{confused}</td></tr>"
        )

    train_by_class: dict[int, Sample] = {}
    for s in index.split("train"):
        train_by_class.setdefault(s.label, s)
    pair_html = []
    for true, pred, count in confused_pairs(confmat, pairs):
        example = next(s for s, p in zip(samples, predicted, strict=True) if s.label == true and p == pred)
        reference = train_by_class.get(pred)
        ref = (
            f'<figure><img src="{thumbnail_uri(reference)}"><figcaption>a training photo of '
            f"<b>{esc(classes[pred])}</b></figcaption></figure>"
            if reference
            else ""
        )
        pair_html.append(
            f'<div class="pair"><h3>{esc(classes[true])} &rarr; {esc(classes[pred])}: {count} of {support[true]}'
            f'</h3><figure><img src="{thumbnail_uri(example)}"><figcaption><b>{esc(classes[true])}</b>, '
            f"predicted {esc(classes[pred])}</figcaption></figure>{ref}</div>"
        )

    mistakes = sorted(
        (i for i, (s, p) in enumerate(zip(samples, predicted, strict=True)) if s.label != p),
        key=lambda i: -confidence[i],
    )[:errors]
    pictures = heatmap_pictures(model, classes, [samples[i] for i in mistakes])
    error_html = [
        f'<figure><img src="{_data_uri(pic)}"><figcaption>true <b>{esc(classes[samples[i].label])}</b><br>'
        f"predicted {esc(classes[predicted[i]])} ({100 * confidence[i]:.0f}%)</figcaption></figure>"
        for i, pic in zip(mistakes, pictures, strict=True)
    ]

    page = TEMPLATE.format(
        title=esc(f"finegrain report: {Path(metrics['checkpoint']).parent.name} on {metrics['split']}"),
        checkpoint=esc(str(metrics["checkpoint"])),
        data=esc(str(metrics["data"])),
        split=esc(metrics["split"]),
        n=metrics["n"],
        top1=100 * metrics["top1"],
        top5=100 * metrics["top5"],
        mpc=100 * metrics["mean_class_acc"],
        confusion=confusion_picture(confmat),
        curves=_curves_html(Path(metrics["checkpoint"]).parent / RunDir.CURVES),
        rows="\n".join(rows),
        pairs="\n".join(pair_html) or "<p>No confusions.</p>",
        errors="\n".join(error_html) or "<p>No mistakes.</p>",
    )
    write_text(out, page, encoding="utf-8")
    return out


def _curves_html(path: Path) -> str:
    """The run's learning curves (``curves.png``, written every epoch), inlined; nothing if the run has none."""
    if not path.is_file():
        return ""
    return f'<h2>Learning curves</h2><img id="curves" src="{_data_uri(Image.open(path), "PNG")}" alt="learning curves">'


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #1d2330; padding: 0 16px; }}
.cards {{ display: flex; gap: 16px; }} .card {{ background: #f1f3f7; border-radius: 8px; padding: 12px 20px; }}
.card b {{ display: block; font-size: 28px; }}
table {{ border-collapse: collapse; width: 100%; font-size: 14px; }}
th, td {{ border-bottom: 1px solid #dde1e8; padding: 4px 8px; text-align: left; }}
th {{ cursor: pointer; background: #f1f3f7; position: sticky; top: 0; }} th:hover {{ background: #e3e7ef; }}
.scroll {{ max-height: 420px; overflow-y: auto; }}
.pair {{ display: inline-block; vertical-align: top; width: 48%; margin: 0 1% 16px 0; }} .pair h3 {{ font-size: 15px; }}
figure {{ display: inline-block; margin: 0 8px 8px 0; vertical-align: top; }}
figcaption {{ font-size: 13px; max-width: 300px; }}
</style></head><body>
<h1>{title}</h1>
<p>checkpoint <code>{checkpoint}</code><br>data <code>{data}</code>, split <b>{split}</b>, {n} images</p>
<div class="cards"><div class="card">top-1<b>{top1:.2f}%</b></div><div class="card">top-5<b>{top5:.2f}%</b></div>
<div class="card">mean per-class<b>{mpc:.2f}%</b></div></div>
{curves}
<h2>Confusion matrix</h2><img src="{confusion}" alt="confusion matrix">
<h2>Per-class accuracy</h2><p>Click a column to sort.</p>
<div class="scroll"><table id="classes"><thead><tr><th>#</th><th>class</th><th>images</th><th>correct</th>
<th>accuracy %</th><th>most often predicted instead</th></tr></thead><tbody>
{rows}
</tbody></table></div>
<h2>Most confused pairs</h2>
{pairs}
<h2>Confident mistakes, with where the model looked (Grad-CAM)</h2>
{errors}
<script>
document.querySelectorAll("#classes th").forEach((th, col) => th.addEventListener("click", () => {{
  const body = th.closest("table").tBodies[0];
  const asc = th.dataset.order !== "asc";
  th.dataset.order = asc ? "asc" : "desc";
  const key = (tr) => {{ const t = tr.cells[col].textContent; const v = parseFloat(t); return isNaN(v) ? t : v; }};
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1))
    .forEach((tr) => body.appendChild(tr));
}}));
</script>
</body></html>
"""
