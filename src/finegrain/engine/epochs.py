"""What an epoch leaves behind: ``last.pt`` with the state ``--resume`` restores, ``best.pt``, the metrics line,
the curves and the trackers (rank 0 only)."""

from __future__ import annotations

import json

import torch.nn as nn
from tqdm import tqdm

from finegrain.checkpoint import Checkpoint
from finegrain.engine.context import Context
from finegrain.engine.setup import set_rng_state
from finegrain.engine.task import Task
from finegrain.engine.tracking import RunTracker, write_curves


def save_epoch(ctx: Context, task: Task, eval_module: nn.Module, epoch: int, row: dict, resume_state: dict | None,
                is_best: bool, tracker: RunTracker, model: nn.Module | None = None) -> None:  # fmt: skip
    """Rank 0 at the end of an epoch: last.pt (with the state ``--resume`` needs), best.pt when validation improved,
    the metrics line, the curves, the trackers, and one line on the terminal."""
    record = epoch_checkpoint(ctx, task, eval_module, row, model or ctx.model, epoch)
    record.resume = resume_state
    record.save(ctx.run_dir / "last.pt")
    if is_best:
        record.resume = None
        record.save(ctx.run_dir / "best.pt")
    with (ctx.run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    write_curves(ctx.run_dir)
    tracker.epoch(row)
    val = f" val top1 {row['val_top1']:.4f}" if "val_top1" in row else ""
    epochs = "probe" if resume_state is None else f"epoch {epoch + 1}/{ctx.cfg.optim.epochs}"
    tqdm.write(f"{epochs}: loss {row['train_loss']:.4f} train acc {row['train_acc']:.4f}{val} "
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
    set_rng_state(state["rng"])
    return state["best"]


def epoch_checkpoint(ctx: Context, task: Task, eval_module: nn.Module, row: dict, model: nn.Module,
                epoch: int | None = None) -> Checkpoint:  # fmt: skip
    """A predict-ready checkpoint of ``model``; with EMA, the averaged weights are the ones to predict with."""
    if eval_module is task.trainable or model is not ctx.model:
        return Checkpoint.from_model(model, ctx.index.classes, config=ctx.cfg.to_dict(), epoch=epoch, metrics=row)
    trained = {k: v.clone() for k, v in task.trainable.state_dict().items()}
    task.trainable.load_state_dict(eval_module.state_dict())
    record = Checkpoint.from_model(model, ctx.index.classes, config=ctx.cfg.to_dict(), epoch=epoch, metrics=row)
    task.trainable.load_state_dict(trained)
    return record
