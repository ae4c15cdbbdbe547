"""finegrain data audit: out-of-fold probe probabilities and confident learning find flipped labels."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from finegrain.cli import main
from finegrain.data import load_dataset
from finegrain.engine.audit import out_of_fold_probabilities
from finegrain.errors import DataError
from finegrain.labels.audit import audit_labels

from .conftest import make_imagefolder, move_some_images


def test_out_of_fold_probabilities_never_see_their_own_image():
    """An image far from its class (its own label) is still predicted as the class it looks like."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4
    labels = np.repeat(np.arange(3), 10)
    feats = torch.tensor(centres[labels] + rng.normal(size=(30, 16)), dtype=torch.float32)
    labels[0] = 1  # looks like class 0, labelled 1
    probs = out_of_fold_probabilities(feats, labels, 3, folds=5, seed=0)
    assert probs.shape == (30, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert probs[0].argmax() == 0
    assert (probs[1:].argmax(1) == labels[1:]).mean() == 1.0


def test_audit_flags_the_moved_images_and_changes_nothing(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "data", num_classes=4, per_class=15)
    moved = move_some_images(root)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    out = tmp_path / "audit"
    code = main(["data", "audit", str(root), "--out", str(out), "--test-fraction", "0", "--folds", "3",
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader((out / "label_issues.csv").open()))
    flagged = [r["path"] for r in rows]
    assert len(set(flagged) & set(moved)) >= 2, flagged
    assert len(set(flagged) & set(moved)) / len(flagged) >= 0.5
    suggested = {r["path"]: r["suggested_label"] for r in rows if r["path"] in moved}
    origin = {m: "class_" + {"class_1": "0", "class_3": "2", "class_0": "3"}[m.split("/")[0]] for m in moved}
    assert suggested == {m: origin[m] for m in suggested}  # each flagged moved image: the class it came from
    assert (out / "label_issues.html").read_text().count("<figure>") == len(rows)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # the data is not touched


def test_audit_needs_enough_images_per_class(tmp_path):
    index = load_dataset(make_imagefolder(tmp_path / "d", num_classes=2, per_class=3), test_fraction=0.0)
    with pytest.raises(DataError, match="fewer than 5 labelled images"):
        audit_labels(index, folds=5, cache_dir=str(tmp_path / "c"), device="cpu")
