"""``finegrain classes add RUN_DIR NEW/``: a checkpoint that also scores new classes, known by words and a photo,
checked on the known classes' validation photos before it is written.

The new classes are added to the model's probe head (a linear layer on L2-normalised features) behind a gate that
compares their prototypes with the known classes' (``engine/new_classes.py``, ``models/added_classes.py``). Then
the known classes' validation photos are classified with and without them: if their top-1 drops by more than
``max_loss`` points, nothing is written and the error says by how much, and what to do. The new checkpoint
predicts, serves and exports like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from finegrain.checkpoint import Checkpoint
from finegrain.config import default_cache_dir
from finegrain.data.class_info import load_class_info
from finegrain.data.loading import open_image
from finegrain.data.transforms import eval_transform
from finegrain.engine.features import extract_features
from finegrain.engine.new_classes import (
    NewClassRows,
    fit_calibration,
    gated_predictions,
    new_class_rows,
    sharpness,
    threshold_for_share,
)
from finegrain.errors import ConfigError, DataError, FinegrainError
from finegrain.models.added_classes import AddedClassesLinear
from finegrain.models.baseline import LinearHead
from finegrain.models.class_embed import EmbeddingSpec, embed_classes
from finegrain.run_layout import RunDir

#: the most top-1 (points) the known classes may lose on their validation photos when classes are added. On cub100
#: (50 known + 50 new, docs/multimodal.md) the calibrated addition cost them 1-3 points on the test photos.
MAX_LOSS = 3.0
CPU = torch.device("cpu")


class AddClassesRefused(FinegrainError):
    """Adding the classes would cost the known classes more than allowed: nothing was written."""


def _probe_head(model: nn.Module) -> nn.Linear:
    head = getattr(model, "head", None)
    if not isinstance(head, LinearHead) or not head.l2:
        raise ConfigError(
            f"classes are added to a linear head on normalised features (the default head, fitted by the probe); "
            f"this model ({getattr(model, 'method', '?')}) has another head. Train with the default head "
            "(`finegrain train`, no --head sgd), or for a textprior model use `predict --class-info NEW/`."
        )
    if isinstance(head[1], AddedClassesLinear):
        raise ConfigError("this checkpoint already has added classes: add every new class at once, to the checkpoint "
                          "the run trained (its best.pt), with all of them in one class_info folder")  # fmt: skip
    return head[1]


def _features(model: nn.Module, samples, ckpt: Checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = ckpt.train_config()
    cache = cfg.features.cache_dir if cfg else default_cache_dir()
    x = extract_features(model, samples, ckpt.preprocess, CPU, cache_dir=cache, desc="features")
    return F.normalize(x.float(), dim=1), torch.tensor([s.label for s in samples])


def _penalty(ckpt: Checkpoint) -> float:
    """The probe's chosen C (probe.json of the run), else the middle of its grid."""
    record = ckpt.run_dir / RunDir.PROBE if ckpt.run_dir else None
    if record and record.is_file():
        return float(json.loads(record.read_text()).get("C_chosen", 10.0))
    return 10.0


def _held_out_loss(rows: NewClassRows, share: float, vx: torch.Tensor, vy: torch.Tensor,
                   known_logits: torch.Tensor) -> tuple[float, float]:  # fmt: skip
    """Known-class top-1 (%) on the held-out photos without and with the new classes, cross-fitted: the threshold is
    set on one half of the photos and the loss counted on the other, both ways, so the photos that set it do not
    also grade it (set and graded on the same photos, the loss is the calibrated share by construction)."""
    order = torch.randperm(len(vx), generator=torch.Generator().manual_seed(0))
    halves = (order[: len(vx) // 2], order[len(vx) // 2 :]) if len(vx) >= 4 else (order, order)
    margin, nearest = rows.margin(vx)
    right_before = known_logits.argmax(1) == vy
    right_after = torch.zeros_like(right_before)
    for fit_on, graded in (halves, halves[::-1]):
        threshold = threshold_for_share(margin[fit_on], share)
        pred = gated_predictions(known_logits[graded], margin[graded], nearest[graded], threshold)
        right_after[graded] = pred == vy[graded]
    return float(right_before.float().mean()) * 100, float(right_after.float().mean()) * 100


def _photo_features(model: nn.Module, ckpt: Checkpoint, new: list[str], images: dict) -> torch.Tensor | None:
    """One row per new class: the mean of its reference photo's and its mirror image's L2-normalised features
    (zero for a class without a photo); None when no class has one."""
    rows = [i for i, c in enumerate(new) if c in images]
    if not rows:
        return None
    transform = eval_transform(ckpt.preprocess)
    batch = torch.stack([transform(open_image(images[new[i]])) for i in rows])
    with torch.inference_mode():
        views = [F.normalize(model.backbone_features(b).float(), dim=1) for b in (batch, batch.flip(-1))]
    photos = torch.zeros(len(new), views[0].shape[1])
    photos[rows] = (views[0] + views[1]) / 2
    return photos


def add_classes(checkpoint: str | Path, class_info: str | Path, out: str | Path | None = None,
                data: str | Path | None = None, max_loss: float = MAX_LOSS, splits: int = 10,
                seed: int = 0) -> dict:  # fmt: skip
    """Write a checkpoint with the new classes of ``class_info`` added; returns what was measured and written.

    Raises :class:`AddClassesRefused` when the known classes' validation top-1 drops by more than ``max_loss``."""
    ckpt = Checkpoint.load(checkpoint)
    model = ckpt.build_model().eval()
    layer = _probe_head(model)
    info = load_class_info(class_info)
    known, new = list(ckpt.classes), info.new_classes(ckpt.classes)
    if not new:
        raise DataError(f"'{class_info}' describes no class the model does not already have: nothing to add")
    index = ckpt.dataset(data)
    tx, ty = _features(model, index.split("train"), ckpt)
    words_used = set(info.match(known)) == set(known) and (bool(info.attributes) or bool(info.descriptions))
    embed_known = embed_new = None
    with_photo = frozenset(c for c in new if c in info.images)
    if words_used:
        spec = EmbeddingSpec.for_info(info)
        embed_known = embed_classes(spec, known, info)
        embed_new = embed_classes(spec, new, info, optional=with_photo)
    no_evidence = [c for c in new if c not in with_photo and not words_used]
    if no_evidence:
        raise DataError(f"new class(es) {', '.join(no_evidence[:5])} have no reference photo (CLASS.jpg in "
                        f"{class_info}), and the known classes are not all described in words there, so nothing "
                        "places them: add a photo per new class, or words for every class")  # fmt: skip
    aim = max(0.0, max_loss - 1.0) / 100  # a point under the limit the check below applies (see MAX_DROP)
    cal = fit_calibration(tx, ty, embed_known, _penalty(ckpt), len(new), splits=splits, max_drop=aim, seed=seed)
    photos = _photo_features(model, ckpt, new, {c: info.images[c] for c in with_photo})
    rows = new_class_rows(cal, tx, ty, photos, embed_known, embed_new)
    val = index.split("val") or index.split("train")  # held-out photos where the run has them
    vx, vy = _features(model, val, ckpt)
    with torch.no_grad():
        known_logits = layer(vx)
    report = {"added": new, "calibration": cal.to_dict(), "words": words_used, "photos": sorted(with_photo)}
    before, after = _held_out_loss(rows, cal.known_share, vx, vy, known_logits)
    split = "validation" if index.split("val") else "training (the run has no validation split)"
    report.update(known_val_before=before, known_val_after=after, known_val_photos=len(val), known_val_split=split)
    if before - after > max_loss:
        raise AddClassesRefused(
            f"adding {len(new)} class(es) would cost the known classes {before - after:.1f} pt of top-1 on their "
            f"{len(val)} {split} photos ({before:.1f}% -> {after:.1f}%; at most {max_loss:g} allowed): no "
            "checkpoint written. Give each new class a reference photo and words for every class in "
            f"{class_info}, or accept the loss with --max-loss {before - after + 0.5:.1f}."
        )
    margin, _ = rows.margin(vx)
    grown = AddedClassesLinear(layer.in_features, layer.out_features, len(new))
    with torch.no_grad():
        grown.known.load_state_dict(layer.state_dict())
        grown.gate.weight.copy_(rows.gate_weight)
        grown.gate.bias.copy_(rows.gate_bias)
        grown.added.weight.copy_(rows.added_weight)
        grown.added.bias.copy_(rows.added_bias)
        grown.threshold.fill_(threshold_for_share(margin, cal.known_share))
        grown.sharpness.fill_(sharpness(margin, known_logits))
    model.head[1] = grown
    model.model_kwargs.update(num_classes=grown.out_features, added_classes=len(new))
    out = Path(out) if out else ckpt.path.with_name(f"{ckpt.path.stem}_added_classes.pt")
    record = {"class_info": str(class_info), **{k: v for k, v in report.items() if k != "photos"}}
    metrics = {**(ckpt.metrics or {}), "added_classes": record}  # the record travels with the checkpoint
    Checkpoint.from_model(model, known + new, config=ckpt.config, metrics=metrics).save(out)
    return {**report, "path": str(out)}
