"""Unlabelled images (``--unlabeled``): self-training with a probe teacher, decided on validation.

Before the task is built, the run's starting backbone (ImageNet's, or ``--init-from``'s) gives features of the
labelled and the unlabelled images (the feature cache keeps both). The teacher is the logistic-regression probe on
the labelled training images, its C chosen on validation. The most confident fraction of the unlabelled images it
assigns to each class join the training split, labelled with its prediction; the fraction is chosen on validation
among ``FRACTIONS`` by refitting the probe with them, and "none" (labels only) wins ties, so unlabelled images are used
only where validation says they help. The run then trains as usual (probe, head on cached features, or fine-tuning)
on the enlarged split, and ``--resume`` rebuilds the same pseudo-labels (the teacher is deterministic).
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from finegrain.data.unlabeled import load_unlabeled
from finegrain.engine.addons.base import AddOn
from finegrain.engine.context import Context
from finegrain.engine.probe import accuracy, fit_probe, l2_normalise, logistic_regressions
from finegrain.engine.task import frozen_features

#: the fractions of each predicted class's unlabelled images tried on validation (with "none": labels only). A
#: fraction, not a confidence threshold: a probe fitted on a few labels per class, with the strong penalty validation
#: then picks, predicts nearly flat probabilities (below 0.5 for every image of a generated 5-class task), so any
#: fixed threshold would use none; ranks within a predicted class also keep the pseudo-labels class-balanced.
FRACTIONS = (0.25, 0.5, 1.0)


def most_confident(confidence: torch.Tensor, labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per predicted class, its ``fraction`` most confident rows (at least one per class predicted)."""
    used = torch.zeros_like(confidence, dtype=torch.bool)
    for k in labels.unique():
        rows = torch.nonzero(labels == k).flatten()
        top = confidence[rows].argsort(descending=True)[: max(1, round(fraction * len(rows)))]
        used[rows[top]] = True
    return used


def choose_pseudo_labels(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor | None,
                         val_y: torch.Tensor | None, unlabeled_x: torch.Tensor, num_classes: int,
                         fraction: float | None = None) -> dict:  # fmt: skip
    """The teacher's labels for the unlabelled rows and which to use: ``used`` (bool per row), ``labels``,
    ``fraction`` (None: none used) and every fraction's validation top-1 (``tried``)."""
    teacher = fit_probe(train_x, train_y, val_x, val_y, num_classes)
    probs = (l2_normalise(unlabeled_x) @ teacher["weight"].T + teacher["bias"]).softmax(1)
    confidence, labels = probs.max(1)
    result = {"teacher_C": teacher["C"], "labels": labels, "confidence": confidence}
    if val_x is None or not len(val_x):
        f = fraction if fraction is not None else min(FRACTIONS)
        why = "--pseudo-fraction" if fraction is not None else "no validation split: the smallest fraction"
        return {**result, "fraction": f, "used": most_confident(confidence, labels, f), "tried": [], "why": why}
    x, vx = l2_normalise(train_x), l2_normalise(val_x)
    tried = [{"fraction": None, "images": 0, "val_top1": teacher["val_top1"]}]
    fractions = [fraction] if fraction is not None else list(FRACTIONS)
    chosen = [most_confident(confidence, labels, f) for f in fractions]
    problems = [(torch.cat([x, l2_normalise(unlabeled_x[u])]), torch.cat([train_y, labels[u]]), teacher["C"])
                for u in chosen]  # fmt: skip
    for f, used, (w, b) in zip(fractions, chosen, logistic_regressions(problems, num_classes), strict=True):
        tried.append({"fraction": f, "images": int(used.sum()), "val_top1": accuracy(w, b, vx, val_y)})
    if fraction is not None:
        best, why = tried[-1], "--pseudo-fraction"
    else:
        best = max(tried, key=lambda r: r["val_top1"])  # the first on ties: labels only
        why = "the highest validation top-1 of the probe refitted with them (labels only on ties)"
    f = best["fraction"]
    used = most_confident(confidence, labels, f) if f is not None else torch.zeros_like(confidence, dtype=torch.bool)
    return {**result, "fraction": f, "used": used, "tried": tried, "why": why}


class UnlabeledAddOn(AddOn):
    name = "unlabeled"
    data_only = True

    @classmethod
    def wanted(cls, cfg) -> bool:
        return cfg.labels.unlabeled is not None

    def prepare(self, ctx: Context) -> None:
        cfg, index = self.cfg, ctx.index
        images = load_unlabeled(cfg.labels.unlabeled, index, cfg.dataset.skip_bad, progress=ctx.info.is_main)
        train, val = index.split("train"), index.split("val")
        train_x = frozen_features(ctx, train, "train", "--unlabeled")
        val_x = frozen_features(ctx, val, "val", "--unlabeled") if val else None
        unlabeled_x = frozen_features(ctx, images.samples, "unlabelled", "--unlabeled")
        labels = {sp: torch.tensor([s.label for s in samples]) for sp, samples in (("train", train), ("val", val))}
        choice = choose_pseudo_labels(train_x, labels["train"], val_x, labels["val"] if val else None, unlabeled_x,
                                      len(index.classes), cfg.labels.pseudo_fraction)  # fmt: skip
        used = torch.nonzero(choice["used"]).flatten().tolist()
        index.samples = index.samples + [
            replace(images.samples[i], label=int(choice["labels"][i]), split="train") for i in used
        ]  # fmt: skip
        if ctx.info.is_main:
            report = {"unlabeled": cfg.labels.unlabeled, **images.report(), "teacher_C": choice["teacher_C"],
                      "fractions_tried": choice["tried"], "fraction": choice["fraction"], "why": choice["why"],
                      "pseudo_labelled": [[str(images.samples[i].path), index.classes[int(choice["labels"][i])],
                                           round(float(choice["confidence"][i]), 4)] for i in used]}  # fmt: skip
            (ctx.run_dir / "unlabeled.json").write_text(json.dumps(report, indent=2))
            f = choice["fraction"]
            ctx.log(f"--unlabeled: {images.summary()}; "
                    + (f"{len(used)} pseudo-labelled (each predicted class's {f:g} most confident) join the training "
                       f"split ({choice['why']})"
                       if f is not None else f"none used: labels alone did as well on validation ({choice['why']})")
                    + "; RUN_DIR/unlabeled.json lists them")  # fmt: skip
