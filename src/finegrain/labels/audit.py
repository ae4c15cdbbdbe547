"""The label audit (``finegrain data audit``): every labelled image (train and val, never test) scored on the
frozen backbone's features by ``finegrain.engine.audit`` (out-of-fold probe, confident learning)."""

from __future__ import annotations

from finegrain.data.records import DatasetIndex
from finegrain.engine.audit import LabelIssue, find_issues, require_folds
from finegrain.engine.distributed import resolve_device
from finegrain.engine.features import extract_features
from finegrain.models import create_model


def audit_labels(index: DatasetIndex, folds: int = 5, seed: int = 0, cache_dir: str | None = None,
                 device: str = "auto") -> tuple[list[LabelIssue], dict]:  # fmt: skip
    """Probably wrong labels among the non-test images, most suspicious first, and a summary."""
    samples = [s for s in index.samples if s.split != "test"]
    require_folds(samples, index.classes, folds, "Add images or lower --folds")
    model = create_model("baseline", num_classes=len(index.classes)).eval()
    feats = extract_features(model, samples, model.preprocess, resolve_device(device), amp="auto",
                             channels_last=True, cache_dir=cache_dir, desc="features")  # fmt: skip
    return find_issues(samples, feats, index.classes, folds, seed)
