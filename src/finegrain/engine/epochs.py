"""What an epoch leaves behind: ``last.pt`` with the state ``--resume`` restores, ``best.pt``, the metrics line,
the curves and the trackers (rank 0 only); and at the run's end, which epoch ``best.pt`` keeps (``--keep-epoch``)."""

from __future__ import annotations

import json
import math

import torch.nn as nn

from finegrain.checkpoint import Checkpoint
from finegrain.engine import distributed as fgdist
from finegrain.engine.context import Context
from finegrain.engine.evaluate import right
from finegrain.engine.setup import set_rng_state
from finegrain.engine.task import Task
from finegrain.engine.tracking import RunTracker, write_curves
from finegrain.progress import say
from finegrain.run_layout import RunDir


def save_epoch(ctx: Context, record: Checkpoint, resume_state: dict | None, is_best: bool, tracker: RunTracker) -> None:
    """Rank 0 at the end of an epoch (or of the probe: no ``resume_state``): last.pt (with the state ``--resume``
    needs), best.pt when validation improved, the metrics line, the curves, the trackers, one line on the terminal."""
    row = record.metrics
    record.resume = resume_state
    record.save(ctx.run_dir / RunDir.LAST)
    if is_best:
        record.resume = None
        record.save(ctx.run_dir / RunDir.BEST)
    with (ctx.run_dir / RunDir.METRICS).open("a") as f:
        f.write(json.dumps(row) + "\n")
    write_curves(ctx.run_dir)
    tracker.epoch(row)
    val = f" val top1 {row['val_top1']:.4f}" if "val_top1" in row else ""
    planned = ctx.cfg.optim.epochs if resume_state is None else resume_state.get("planned_epochs", ctx.cfg.optim.epochs)
    epochs = "probe" if resume_state is None else f"epoch {record.epoch + 1}/{planned}"  # of the plan as re-planned
    say(f"{epochs}: loss {row['train_loss']:.4f} train acc {row['train_acc']:.4f}{val} "
               f"({row['epoch_seconds']:.1f}s, {row['samples_per_s']:.1f}/s)")  # fmt: skip


def restore(state: dict, task: Task, optimizer, ema, ctx: Context) -> float:
    """Everything ``last.pt`` saved for resume; returns the best validation score so far."""
    task.trainable.load_state_dict(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])  # the schedule is a function of the step: nothing to load
    if ema is not None:
        ema.load_state_dict(state["ema"])
    for addon in ctx.addons:
        if state.get("addons", {}).get(addon.name) is not None:
            addon.load_state_dict(state["addons"][addon.name])
    rng = state["rng"]  # one state per rank (a single dict in runs saved before that)
    set_rng_state(rng[ctx.info.rank % len(rng)] if isinstance(rng, list) else rng)
    return state["best"]


def model_checkpoint(ctx: Context, model: nn.Module, row: dict, epoch: int | None = None) -> Checkpoint:
    """The predict-ready checkpoint of ``model`` with this run's config and the epoch's metrics."""
    return Checkpoint.from_model(model, ctx.index.classes, config=ctx.cfg.to_dict(), epoch=epoch, metrics=row)


def epoch_checkpoint(ctx: Context, task: Task, eval_module: nn.Module, row: dict, epoch: int) -> Checkpoint:
    """The run's model after an epoch; with EMA (``eval_module`` is the average) the averaged weights, the ones to
    predict with."""
    if eval_module is task.trainable:
        return model_checkpoint(ctx, ctx.model, row, epoch)
    trained = {k: v.clone() for k, v in task.trainable.state_dict().items()}
    task.trainable.load_state_dict(eval_module.state_dict())
    record = model_checkpoint(ctx, ctx.model, row, epoch)
    task.trainable.load_state_dict(trained)
    return record


#: how far (McNemar's z, on the validation images the two epochs answer differently) an earlier epoch must beat the
#: schedule's end for ``--keep-epoch auto`` to keep it
MIN_Z = 2.0


def paired_z(a_right: list[bool], b_right: list[bool]) -> dict:
    """How much better ``a`` answers the same images than ``b``, against their noise. Paired: only the images the two
    answer differently count (McNemar's z = (a_only - b_only) / sqrt(a_only + b_only); 0 when they agree)."""
    a = sum(1 for x, y in zip(a_right, b_right, strict=True) if x and not y)
    b = sum(1 for x, y in zip(a_right, b_right, strict=True) if y and not x)
    return {"a_only": a, "b_only": b, "z": round((a - b) / math.sqrt(a + b), 2) if a + b else 0.0}


def earlier_is_better(earlier: list[bool], end: list[bool], min_z: float = MIN_Z) -> tuple[bool, dict]:
    """Does the earlier epoch answer the same validation images better than the end, beyond their noise?"""
    z = paired_z(earlier, end)
    return z["z"] > min_z, {"earlier_only": z["a_only"], "end_only": z["b_only"], "z": z["z"]}


class KeptEpoch:
    """Which epoch becomes ``best.pt`` (``--keep-epoch``). ``best`` keeps the highest validation top-1 (ties: the
    later); ``last`` the schedule's end; ``auto`` the end unless an earlier epoch answers the validation images better
    by more than their noise (:func:`earlier_is_better`).

    Why not simply the best: the highest of 10-60 epochs' scores on a validation split of 60-300 images is the
    luckiest, not the best. Re-evaluated on the test splits (AMD EPYC Zen 5, 2026-12-03), the frontier runs' last
    epochs scored at least as well as their best-validated ones on all seven checked (+1.02 pt on average; e.g.
    flowers17 --budget 30 kept epoch 4 of 40: 97.43, its end 98.90), where the best-validated epoch led by one to
    three of 60-210 validation images (benchmarks/keep_epoch.py)."""

    def __init__(self, rule: str, state: dict | None = None) -> None:
        self.rule = rule
        state = state or {}
        self.best_epoch, self.best_right = state.get("best_epoch"), state.get("best_right")
        self.end_epoch, self.end_right = state.get("end_epoch"), state.get("end_right")
        self.end_score = state.get("end_score")

    @property
    def wants_answers(self) -> bool:
        return self.rule == "auto"

    def saw(self, epoch: int, metrics: dict | None, score: float, is_best: bool) -> None:
        """Epoch ``epoch`` (1-based) ended with validation ``metrics`` (with its answers where wanted)."""
        answers = None
        if self.wants_answers and metrics is not None:
            answers = [r for rank in fgdist.all_gather_objects(right(metrics)) for r in rank]
        self.end_epoch, self.end_right, self.end_score = epoch, answers, score
        if is_best:
            self.best_epoch, self.best_right = epoch, answers

    def state_dict(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_right": self.best_right, "end_epoch": self.end_epoch,
                "end_right": self.end_right, "end_score": self.end_score}  # fmt: skip

    def finish(self, ctx: Context) -> float | None:
        """At the run's end: where the rule keeps the end and it is not best.pt already, best.pt becomes the end's
        checkpoint (rank 0 writes); returns the kept end's score (None: best.pt unchanged)."""
        if self.rule == "best" or self.end_epoch is None or self.end_epoch == self.best_epoch:
            return None
        why = "--keep-epoch last"
        if self.rule == "auto":
            if self.best_right is None or self.end_right is None:
                return None
            earlier, counts = earlier_is_better(self.best_right, self.end_right)
            if earlier:
                ctx.log(f"best.pt: epoch {self.best_epoch}, not the end (epoch {self.end_epoch}): right on "
                        f"{counts['earlier_only']} validation image(s) the end missed, the end on "
                        f"{counts['end_only']} it missed (z {counts['z']} > {MIN_Z})")  # fmt: skip
                return None
            why = (f"epoch {self.best_epoch} validated higher: right on {counts['earlier_only']} validation "
                   f"image(s) the end missed, the end on {counts['end_only']} it missed (z {counts['z']} <= {MIN_Z}: "
                   "noise)")  # fmt: skip
        if ctx.info.is_main:
            record = Checkpoint.load(ctx.run_dir / RunDir.LAST)
            record.resume = None
            record.save(ctx.run_dir / RunDir.BEST)
        ctx.log(f"best.pt: the schedule's end, epoch {self.end_epoch} ({why})")
        return self.end_score
