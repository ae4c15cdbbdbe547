"""Unlabelled images (``--unlabeled``): self-training with a probe or checkpoint teacher, decided on held-out
labelled images.

Before the task is built, the run's starting backbone (ImageNet's, or ``--init-from``'s) gives features of the
labelled and the unlabelled images (the feature cache keeps both). The teacher is the logistic-regression probe on
the labelled training images, its C chosen on the same held-out images as the fraction (``folds_c``). The most
confident fraction of the unlabelled images it assigns to each class join the training split, labelled with its
prediction. The fraction is chosen among ``FRACTIONS`` on held-out labelled images (the validation split and a
``CV_FOLDS``-fold cross-validation of the training split: per fold a teacher pseudo-labels, the probe is refitted
with each fraction, the fold is scored); "none" (labels only) is kept unless the best fraction beats it by more than
the held-out images' noise (``NOISE_SD``), so unlabelled images are used only where held-out labels say they help.

With ``--teachers`` (checkpoints, e.g. a fine-tuned run on the same labels and split) the teachers' averaged softmax
labels the unlabelled images instead of the probe, and distillation also trains on their soft labels unless
``--kd-alpha 0``: one round of the noisy student. The judgement is the same, with the teachers' labels fixed in
every fold (the teachers saw the folds' labels, so the cross-validation is optimistic for them; the validation split
is not). The run then trains as usual (probe, head on cached features, or fine-tuning) on the enlarged split, and
``--resume`` rebuilds the same pseudo-labels (the teacher and the folds are deterministic).
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch
from sklearn.model_selection import StratifiedKFold

from finegrain.atomic import write_text
from finegrain.data.unlabeled import load_unlabeled
from finegrain.engine import distributed as fgdist
from finegrain.engine.addons.base import AddOn
from finegrain.engine.context import Context
from finegrain.engine.probe import fit_probe, folds_c, hits, l2_normalise, logistic_regression, logistic_regressions
from finegrain.engine.task import frozen_features
from finegrain.engine.teachers import load_teachers, teacher_probs
from finegrain.run_layout import RunDir

#: the fractions of each predicted class's unlabelled images tried on held-out labels (with "none": labels only). A
#: fraction, not a confidence threshold: a probe fitted on a few labels per class, with the strong penalty validation
#: then picks, predicts nearly flat probabilities (below 0.5 for every image of a generated 5-class task), so any
#: fixed threshold would use none; ranks within a predicted class also keep the pseudo-labels class-balanced.
FRACTIONS = (0.25, 0.5, 1.0)

#: folds of the cross-validation that, with the validation split, judges whether pseudo-labels help. The validation
#: split alone was too small to see it: cub100 with 30% of its labels has 99 validation images, and it chose "labels
#: only" for both seeds, while on seed 0 the refitted probe gained 1.1-2.0 pt on the test split (2026-11-28,
#: docs/labels.md); with the folds all 879 labelled images judge, and the 30% setting closed 23% of the gap to full
#: labels on cub100 instead of 0%.
CV_FOLDS = 5

#: the guard: pseudo-labels are used only where the best fraction's held-out images right exceed labels only's by
#: more than this many standard deviations of a paired difference with no effect (sqrt of the images the two answer
#: differently, McNemar's). Where they do not, the run trains on the labels alone and says so: on plantvillage_tomato
#: (30% labels) the model a user got with the unlabelled images was 3 pt under labels only (83.0 vs 86.0,
#: docs/labels.md). Why 1.5 (2026-12-03, the probe's C from validation): at 1.0, unlabelled points drawn from 5
#: *other* classes passed on 1 of 10 generated tasks (+3 images, noise 2.2: tests/test_labels_training.py); at 2.0,
#: cub100 with 30% labels (seed 0) would have been refused (+12 of 879 images, noise 7.5), where its pseudo-labels
#: gave +6.5 pt test top-1 on maps. With C from the folds (``folds_c``), other classes pass on 2 of 40 tasks at 0
#: and none at 1.0; cub100 seeds 0 and 1 pass at 1.5 (+14 and +22 images, noise 11.2 and 12.7).
NOISE_SD = 1.5


def most_confident(confidence: torch.Tensor, labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per predicted class, its ``fraction`` most confident rows (at least one per class predicted)."""
    used = torch.zeros_like(confidence, dtype=torch.bool)
    for k in labels.unique():
        rows = torch.nonzero(labels == k).flatten()
        top = confidence[rows].argsort(descending=True)[: max(1, round(fraction * len(rows)))]
        used[rows[top]] = True
    return used


def held_out_splits(train_y: torch.Tensor, val_y: torch.Tensor | None,
                    folds: int = CV_FOLDS) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """The (fit rows, judged rows) pairs a use of pseudo-labels is judged on, as indices into the training rows
    followed by the validation rows: all training rows -> the validation split, and ``folds``-fold stratified
    cross-validation of the training rows (fewer folds where a class has fewer images; none below two)."""
    n, counts = len(train_y), train_y.bincount()
    folds = min(folds, int(counts[counts > 0].min()))
    splits = [] if val_y is None or not len(val_y) else [(torch.arange(n), torch.arange(n, n + len(val_y)))]
    if folds >= 2:
        kfold = StratifiedKFold(folds, shuffle=True, random_state=0)  # fixed: --resume rebuilds the same choice
        splits += [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in kfold.split(train_y.numpy(), train_y.numpy())]
    return splits


def judge_fractions(x: torch.Tensor, y: torch.Tensor, unlabeled_x: torch.Tensor, splits: list, c: float,
                    fractions: list[float], num_classes: int,
                    fixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """Which held-out images are answered right (bool, one row for labels only and one per fraction, one column per
    held-out image of every split in turn): per split a teacher on its fit rows pseudo-labels the unlabelled rows (or
    they keep ``fixed`` (confidence, labels): a checkpoint teacher's), and the probe is refitted with each fraction."""
    probes = list(logistic_regressions([(x[fit], y[fit], c) for fit, _ in splits], num_classes))
    problems, right = [], [[] for _ in range(1 + len(fractions))]
    for (fit, held), (w, b) in zip(splits, probes, strict=True):
        right[0].append(hits(w, b, x[held], y[held]))
        confidence, labels = fixed if fixed is not None else (unlabeled_x @ w.T + b).softmax(1).max(1)
        for f in fractions:
            used = most_confident(confidence, labels, f)
            problems.append((torch.cat([x[fit], unlabeled_x[used]]), torch.cat([y[fit], labels[used]]), c))
    students = logistic_regressions(problems, num_classes)
    for _, held in splits:  # the students come in the order of the problems: per split, per fraction
        for i in range(1, 1 + len(fractions)):
            w, b = next(students)
            right[i].append(hits(w, b, x[held], y[held]))
    return torch.stack([torch.cat(r) for r in right])


def beyond_noise(right: torch.Tensor, base: torch.Tensor) -> tuple[int, float]:
    """How many more held-out images ``right`` answers than ``base`` and the noise of that number: ``NOISE_SD``
    standard deviations of a paired difference with no effect (sqrt of the images the two answer differently)."""
    return int(right.sum() - base.sum()), NOISE_SD * float((right != base).sum()) ** 0.5


def choose_pseudo_labels(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor | None,
                         val_y: torch.Tensor | None, unlabeled_x: torch.Tensor, num_classes: int,
                         fraction: float | None = None, teacher: torch.Tensor | None = None) -> dict:  # fmt: skip
    """The teacher's labels for the unlabelled rows and which to use: ``used`` (bool per row), ``labels``,
    ``fraction`` (None: none used) and what each option scored on held-out labelled images (``tried``). The teacher
    is the probe on the labelled rows or, given, ``teacher``: a checkpoint teacher's probabilities for the rows."""
    has_val = val_x is not None and len(val_x) > 0
    x = l2_normalise(torch.cat([train_x, val_x]) if has_val else train_x)
    y = torch.cat([train_y, val_y]) if has_val else train_y
    splits = held_out_splits(train_y, val_y if has_val else None)
    c = folds_c(x, y, splits, num_classes) if splits else fit_probe(train_x, train_y, None, None, num_classes)["C"]
    given = teacher is not None
    if not given:
        w, b = logistic_regression(x[: len(train_y)], train_y, num_classes, c)  # x: the training rows first
        teacher = (l2_normalise(unlabeled_x) @ w.T + b).softmax(1)
    confidence, labels = teacher.max(1)
    result = {"teacher_C": c, "labels": labels, "confidence": confidence}
    if fraction is not None:
        used = most_confident(confidence, labels, fraction)
        return {**result, "fraction": fraction, "used": used, "tried": [], "why": "--pseudo-fraction"}
    if not splits:
        f = min(FRACTIONS)
        why = "no validation split and too few images per class to cross-validate: the smallest fraction"
        return {**result, "fraction": f, "used": most_confident(confidence, labels, f), "tried": [], "why": why}
    fixed = (confidence, labels) if given else None
    right = judge_fractions(x, y, l2_normalise(unlabeled_x), splits, c, list(FRACTIONS), num_classes, fixed)
    judged = right.shape[1]
    tried = []
    for f, r in zip([None, *FRACTIONS], right, strict=True):
        gain, noise = beyond_noise(r, right[0])
        tried.append({"fraction": f, "held_out_top1": float(r.float().mean()), "held_out_images": judged,
                      "gain_images": gain, "noise_images": round(noise, 1)})  # fmt: skip
    best = max(tried, key=lambda r: r["held_out_top1"])  # the first on ties: labels only
    folds = len(splits) - has_val
    where = (f"{judged} held-out labelled images (validation split and {folds}-fold cross-validation of the training "
             "split)")  # fmt: skip
    if best["fraction"] is not None and best["gain_images"] <= best["noise_images"]:
        why = (f"labels only: the best fraction ({best['fraction']:g}) answered {best['gain_images']} more of {where} "
               f"right, within their noise ({best['noise_images']:g} images, NOISE_SD x sqrt(images answered "
               "differently))")  # fmt: skip
        best = tried[0]
    elif best["fraction"] is not None:
        why = (f"the highest top-1 on {where}: {best['gain_images']} more right than labels only, beyond their noise "
               f"({best['noise_images']:g} images)")  # fmt: skip
    else:
        why = f"labels only: no fraction did better on {where}"
    f = best["fraction"]
    used = most_confident(confidence, labels, f) if f is not None else torch.zeros_like(confidence, dtype=torch.bool)
    return {**result, "fraction": f, "used": used, "tried": tried, "why": why}


class UnlabeledAddOn(AddOn):
    name = "unlabeled"
    REPORT = RunDir.UNLABELED
    files = (REPORT,)
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
        teacher = None
        if cfg.distill.teachers:  # the noisy student: the teachers pseudo-label, the probe only judges the fraction
            teachers = load_teachers(ctx)
            teacher = fgdist.main_first(ctx.info, lambda: teacher_probs(ctx, teachers, images.samples))
        labels = {sp: torch.tensor([s.label for s in samples]) for sp, samples in (("train", train), ("val", val))}
        choice = choose_pseudo_labels(train_x, labels["train"], val_x, labels["val"] if val else None, unlabeled_x,
                                      len(index.classes), cfg.labels.pseudo_fraction, teacher)  # fmt: skip
        used = torch.nonzero(choice["used"]).flatten().tolist()
        index.samples = index.samples + [
            replace(images.samples[i], label=int(choice["labels"][i]), split="train") for i in used
        ]  # fmt: skip
        if ctx.info.is_main:
            report = {"unlabeled": cfg.labels.unlabeled, **images.report(),
                      "teacher": list(cfg.distill.teachers) or "probe", "teacher_C": choice["teacher_C"],
                      "fractions_tried": choice["tried"], "fraction": choice["fraction"], "why": choice["why"],
                      "pseudo_labelled": [[str(images.samples[i].path), index.classes[int(choice["labels"][i])],
                                           round(float(choice["confidence"][i]), 4)] for i in used]}  # fmt: skip
            write_text(ctx.run_dir / self.REPORT, json.dumps(report, indent=2))
            f = choice["fraction"]
            ctx.log(f"--unlabeled: {images.summary()}; "
                    + (f"{len(used)} pseudo-labelled (each predicted class's {f:g} most confident) join the training "
                       f"split ({choice['why']})"
                       if f is not None else f"none used ({choice['why']})")
                    + f"; RUN_DIR/{self.REPORT} lists them")  # fmt: skip
