"""Label audit scoring: which training labels are probably wrong, without changing the data (the workflow,
``finegrain data audit``, is ``finegrain.labels.audit``; the ``--label-noise`` add-on uses the same scoring).

Every labelled image (train and val, never test) is scored by a probe that did not see it: the frozen backbone's
features, ``folds`` stratified folds, on each the logistic-regression probe of ``finegrain.engine.probe`` fitted on
the other folds. From these out-of-fold probabilities, confident learning (Northcutt et al. 2021, "Confident
learning: estimating uncertainty in dataset labels"; cleanlab's ``find_label_issues``, prune-by-noise-rate) flags
the images whose given label disagrees with what the rest of the data says, ranked by the probability of the given
label (the most suspicious first). Measured on cub100 with flipped labels in docs/labels.md.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finegrain.atomic import atomic_path
from finegrain.data import DatasetIndex, Sample
from finegrain.engine.probe import l2_normalise, logistic_regressions
from finegrain.errors import ConfigError, DataError
from finegrain.escape import csv_cell
from finegrain.progress import progress_bar

#: the probe's penalty for the audit (no validation split to choose it on: every image is scored out of fold);
#: the middle of the probe's grid, where its choice fell on the development datasets (docs/training.md)
AUDIT_C = 10.0


@dataclass
class LabelIssue:
    sample: Sample
    given: str
    suggested: str
    p_given: float
    p_suggested: float


def out_of_fold_probabilities(feats: torch.Tensor, labels: np.ndarray, num_classes: int, folds: int,
                              seed: int) -> np.ndarray:  # fmt: skip
    """(N, num_classes) probabilities, each row from a probe fitted on the other folds (stratified by class)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=int)
    for k in range(num_classes):  # deal each class's images round the folds in a random order
        idx = rng.permutation(np.flatnonzero(labels == k))
        fold[idx] = (np.arange(len(idx)) + rng.integers(folds)) % folds
    x, y = l2_normalise(feats), torch.as_tensor(labels)
    probs = np.zeros((len(labels), num_classes), dtype=np.float32)
    held = [torch.as_tensor(fold == f) for f in range(folds)]
    fits = logistic_regressions([(x[~h], y[~h], AUDIT_C) for h in held], num_classes)
    for h, (w, b) in zip(held, progress_bar(fits, total=folds, desc="out-of-fold probes", leave=False), strict=True):
        probs[h.numpy()] = (x[h] @ w.T + b).softmax(1).numpy()
    return probs


def require_folds(samples: list[Sample], classes: list[str], folds: int, fix: str) -> None:
    """Refuse (naming the classes) when a class has fewer labelled images than folds."""
    counts = np.bincount([s.label for s in samples], minlength=len(classes))
    if (counts < folds).any():
        few = [classes[k] for k in np.flatnonzero(counts < folds)]
        raise DataError(f"out-of-fold scoring trains each probe on the other {folds - 1} folds: class(es) "
                        f"{', '.join(few[:5])} have fewer than {folds} labelled images. {fix}")  # fmt: skip


def find_issues(samples: list[Sample], feats: torch.Tensor, classes: list[str], folds: int,
                seed: int) -> tuple[list[LabelIssue], dict]:  # fmt: skip
    """Probably wrong labels among ``samples`` (whose frozen features are ``feats``), most suspicious first."""
    labels = np.array([s.label for s in samples])
    probs = out_of_fold_probabilities(feats, labels, len(classes), folds, seed)
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as e:
        raise ConfigError("finding wrong labels uses cleanlab: pip install 'finegrain[labels]'") from e
    flagged = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    issues = []
    for i in flagged:
        other = probs[i].copy()
        other[labels[i]] = -1.0
        j = int(other.argmax())
        issues.append(LabelIssue(samples[i], classes[labels[i]], classes[j], float(probs[i, labels[i]]),
                                 float(probs[i, j])))  # fmt: skip
    summary = {"images": len(samples), "flagged": len(issues), "folds": folds, "C": AUDIT_C,
               "out_of_fold_top1": float((probs.argmax(1) == labels).mean())}  # fmt: skip
    return issues, summary


def write_audit_csv(issues: list[LabelIssue], index: DatasetIndex, path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "path", "given_label", "suggested_label", "p_given", "p_suggested"])
        for rank, e in enumerate(issues, 1):
            w.writerow([rank, *map(csv_cell, (index.relpath(e.sample), e.given, e.suggested)), f"{e.p_given:.4f}",
                        f"{e.p_suggested:.4f}"])  # fmt: skip
