"""What an epoch leaves behind: ``last.pt`` with the state ``--resume`` restores, ``best.pt``, the metrics line,
the curves and the trackers (rank 0 only)."""

from __future__ import annotations

import json

import torch.nn as nn

from finegrain.checkpoint import Checkpoint
from finegrain.engine.context import Context
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
