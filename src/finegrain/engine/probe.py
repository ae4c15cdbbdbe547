"""The linear probe: multinomial logistic regression on L2-normalised frozen features, its penalty chosen on the
validation split, solved (scikit-learn's ``LogisticRegression``, L-BFGS) instead of trained for a fixed number of
epochs.

It is the textbook probe itself, not a copy: a torch L-BFGS solving the same objective to a tighter tolerance was
used before, and its solutions differed from scikit-learn's by one or two test images on plantvillage_tomato and
gtsrb_finegrained (the same C and crop chosen), for no measured gain and more code. Why it is the default head:
see ``PROBE_C`` and docs/training.md (the four-domain table).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from joblib import Parallel, delayed
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, TensorDataset

from finegrain.atomic import write_text
from finegrain.data.transforms import Preprocess
from finegrain.engine.context import Context
from finegrain.engine.evaluate import evaluate
from finegrain.engine.task import Task, split_features
from finegrain.env import physical_cores
from finegrain.run_layout import RunDir

#: the penalties tried on the validation split (scikit-learn's C: larger is weaker). On the validation splits of the
#: four development datasets the best C ranged from 3 to 100 (docs/training.md), so the grid spans it with room.
PROBE_C = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)

#: the second view the probe tries (the first is the run's own, whole images by default): ImageNet's centre crop.
#: On validation (seed 0, 2026-11-28) it was better for flowers17, plantvillage_tomato and gtsrb_finegrained (whose
#: 32-px signs carry a ~10% border) and worse for cub100, so it is chosen per dataset, not fixed (docs/training.md)
OTHER_CROP = 0.875


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=1)


def logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float,
                        max_iter: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(W, b) of scikit-learn's ``LogisticRegression(C=c)`` (multinomial, L-BFGS to its own tolerance) on the rows
    of ``x``, as ``num_classes`` rows: a class absent from ``y`` gets zero weights and a bias below every other, so
    it is never predicted; with two classes present, scikit-learn's single logit becomes the equivalent pair."""
    labels = y.long().numpy()
    present = np.unique(labels)
    w = torch.zeros(num_classes, x.shape[1])
    b = torch.zeros(num_classes)
    if len(present) == 1:  # nothing to separate: always that class
        b[:] = -1e4
        b[int(present[0])] = 0.0
        return w, b
    with threadpool_limits(limits=1):  # see logistic_regressions: the answer must not depend on the thread count
        clf = LogisticRegression(C=c, max_iter=max_iter).fit(x.float().numpy(), labels)
    coef, intercept = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
    if len(present) == 2:
        coef, intercept = torch.cat([-coef, coef]) / 2, torch.cat([-intercept, intercept]) / 2
    b[:] = intercept.min() - 1e4
    w[torch.from_numpy(present)] = coef
    b[torch.from_numpy(present)] = intercept
    return w, b


def hits(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Which rows the linear model ``(w, b)`` answers right (bool per row)."""
    return (x.float() @ w.T + b).argmax(1) == y


def accuracy(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(hits(w, b, x, y).float().mean())


def logistic_regressions(problems: list[tuple[torch.Tensor, torch.Tensor, float]],
                         num_classes: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """:func:`logistic_regression` of every ``(x, y, C)`` in ``problems``, in order as each is solved: side by side
    in threads, each with one BLAS/OpenMP thread (for the time the answers are read too).

    Why: these are small problems (thousands of rows, 1,280 features), where BLAS threads cost more than they give.
    On cub100's features (5,902 x 1,280, 100 classes, C = 1, 10, 100; AMD EPYC Zen 4, 2 cores, 2026-11-28) the
    three fits took 11.7 s with the default two threads each, 6.6 s with one, and 4.2 s with one each, two fits at a
    time; the answers are identical. On a 16-core Xeon of a GPU machine the default threading made the probe of
    the README's first command take over 100 s, longer than everything else in it."""
    with threadpool_limits(limits=1):
        yield from Parallel(n_jobs=min(len(problems), physical_cores()), backend="threading", return_as="generator")(
            delayed(logistic_regression)(x, y, num_classes, c) for x, y, c in problems
        )


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor | None, val_y: torch.Tensor | None,
              num_classes: int, grid: tuple[float, ...] = PROBE_C) -> dict:  # fmt: skip
    """Normalise, try every C of ``grid`` on the validation split, keep the best (the smallest C on ties: the
    strongest penalty that is as good). Without a validation split, the middle of the grid is used."""
    train_x = l2_normalise(train_x)
    if val_x is None or not len(val_x):
        c = grid[len(grid) // 2]
        w, b = logistic_regression(train_x, train_y, num_classes, c)
        return {"weight": w, "bias": b, "C": c, "val_top1": None, "sweep": []}
    val_x, sweep = l2_normalise(val_x), []
    fitted = dict(zip(grid, logistic_regressions([(train_x, train_y, c) for c in grid], num_classes), strict=True))
    for c, (w, b) in fitted.items():
        sweep.append({"C": c, "val_top1": accuracy(w, b, val_x, val_y), "train_top1": accuracy(w, b, train_x, train_y)})
    best = max(sweep, key=lambda r: (r["val_top1"], -r["C"]))
    w, b = fitted[best["C"]]
    return {"weight": w, "bias": b, "C": best["C"], "val_top1": best["val_top1"], "sweep": sweep}


def folds_c(x: torch.Tensor, y: torch.Tensor, splits: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
            grid: tuple[float, ...] = PROBE_C) -> float:  # fmt: skip
    """The C of ``grid`` whose probes answer the most held-out rows right over ``splits`` ((fit rows, judged rows)
    pairs of the L2-normalised ``x``); the smallest C on ties.

    Why, where the labelled images are few: a 20-image validation split chose C = 0.3 for plantvillage_tomato at 30%
    of its labels (seed 0), whose probes answered 118 of the 180 held-out images of the validation split and 5 folds
    right; C = 30 answered 135, and pseudo-labelled the most confident half of the unlabelled images 89% right
    instead of 81% (cub100, seed 1: C 3 -> 300, 94% -> 96%; 2026-12-03, docs/labels.md)."""
    problems = [(x[fit], y[fit], c) for c in grid for fit, _ in splits]
    fits = iter(logistic_regressions(problems, num_classes))
    right = {c: sum(int(hits(*next(fits), x[held], y[held]).sum()) for _, held in splits) for c in grid}
    return max(grid, key=lambda c: (right[c], -c))


def set_linear(layer: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)


def probe_candidate(ctx: Context, task: Task) -> tuple[nn.Module, nn.Linear] | None:
    """A copy of the model whose head the probe may solve, and that head's linear layer; None where the probe does
    not apply: training on images, ``--head sgd``, an add-on that shapes gradient training (not ``data_only``),
    or a method without a linear head on its features (``FGVCModel.probe_head``)."""
    if not task.solves_head or ctx.cfg.features.head == "sgd" or any(not a.data_only for a in ctx.addons):
        return None
    candidate = copy.deepcopy(ctx.model)
    layer = candidate.probe_head()
    return None if layer is None else (candidate, layer)


@dataclass
class View:
    """Cached features of one view of the images (a preprocessing, with or without mirrored copies)."""

    preprocess: Preprocess
    mirrored: bool
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor | None
    val_y: torch.Tensor | None


def probe_views(ctx: Context, task: Task) -> list[View]:
    """The task's own view, and with a validation split the other crop (``OTHER_CROP`` <-> whole image, un-mirrored)."""
    pre = ctx.model.preprocess
    train_x, train_y = task.train_set.tensors[:2]
    val_x, val_y = task.val_set.tensors if task.val_set is not None else (None, None)
    views = [View(pre, len(train_x) > len(ctx.index.split("train")), train_x, train_y, val_x, val_y)]
    if val_x is not None:
        other = replace(pre, crop_pct=OTHER_CROP if pre.crop_pct != OTHER_CROP else 1.0)
        other_train, other_val = split_features(ctx, other, [False])
        views.append(View(other, False, other_train, train_y[: len(other_train)], other_val, val_y))
    return views


def run_probe(ctx: Context, task: Task, model: nn.Module, layer: nn.Linear) -> dict:
    """Fit ``layer`` (``model``'s ``probe_head``) on every view of ``probe_views``; keep the view and C with the best
    validation top-1 (the task's view on ties). Returns the epoch-like metrics row; ``RUN_DIR/probe.json`` has
    every view and C tried."""
    start = time.perf_counter()
    tried = [(fit_probe(v.train_x, v.train_y, v.val_x, v.val_y, layer.out_features), v) for v in probe_views(ctx, task)]
    result, view = max(tried, key=lambda t: t[0]["val_top1"] or 0.0)  # the first on ties
    set_linear(layer, result["weight"], result["bias"])
    model.preprocess = view.preprocess
    train_acc = accuracy(result["weight"], result["bias"], l2_normalise(view.train_x), view.train_y)
    row = {"epoch": 1, "probe_C": result["C"], "probe_crop_pct": view.preprocess.crop_pct, "train_acc": train_acc,
           "train_loss": float("nan")}  # fmt: skip
    if view.val_x is not None:
        loader = DataLoader(TensorDataset(view.val_x, view.val_y), batch_size=256)
        m = evaluate(model.head, loader, layer.out_features, ctx.device)
        row.update({f"val_{k}": m[k] for k in ("n", "top1", "top5", "mean_class_acc", "loss")})
    seconds = time.perf_counter() - start
    fits = sum(max(1, len(r["sweep"])) for r, _ in tried)
    row.update({"lr": 0.0, "epoch_seconds": seconds, "samples_per_s": len(view.train_x) * fits / seconds})
    if ctx.info.is_main:
        why = "the highest validation top-1 (the task's view, then the smallest C, on ties)"
        why = why if result["sweep"] else "no validation split: the middle of the grid, the run's view"
        views = [
            {"crop_pct": v.preprocess.crop_pct, "mirrored_too": v.mirrored, "C_tried": r["sweep"]} for r, v in tried
        ]
        report = {"views": views, "crop_pct_chosen": view.preprocess.crop_pct, "C_chosen": result["C"], "why": why}
        write_text(ctx.run_dir / RunDir.PROBE, json.dumps(report, indent=2))
        ctx.log(f"probe: logistic regression on L2-normalised features, crop {view.preprocess.crop_pct:g} and "
                f"C={result['C']:g} chosen on validation ({fits} fits, {seconds:.1f}s)")  # fmt: skip
    return row


def write_recipe(ctx: Context, probe_row: dict, sgd_val_top1: float | None) -> None:
    """``RUN_DIR/recipe.json``: which head fitting was tried, its validation top-1, and which one was kept, why."""
    probe = {"val_top1": probe_row.get("val_top1"), "C": probe_row["probe_C"], "crop_pct": probe_row["probe_crop_pct"]}
    candidates = {"probe": probe}
    if sgd_val_top1 is None:
        chosen, why = "probe", "--head probe"
    else:
        candidates["sgd"] = {"val_top1": sgd_val_top1, "epochs": ctx.cfg.optim.epochs}
        chosen = "probe" if probe_row["val_top1"] > sgd_val_top1 else "sgd"
        why = f"--head auto: the higher validation top-1 ({chosen}; the epochs' head on ties)"
    recipe = {"head": ctx.cfg.features.head, "candidates": candidates, "chosen": chosen, "why": why}
    write_text(ctx.run_dir / RunDir.RECIPE, json.dumps(recipe, indent=2))
    ctx.log(
        f"head: {chosen} kept ({why}; validation top-1 "
        + ", ".join(f"{k} {v['val_top1']:.4f}" for k, v in candidates.items() if v["val_top1"] is not None)
        + ")"
    )
