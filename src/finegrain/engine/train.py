"""The training loop: set the run up, build the task, then per epoch train, validate and save.

One loop serves full fine-tuning and a head on cached features, and runs under ``torchrun``: each rank trains
on its shard (DistributedSampler), DDP averages gradients, metrics are summed across ranks, and only rank 0
writes files. What is optional (distillation, center loss, style mixing, SR augmentation, QAT, progressive
stages) is an add-on (``finegrain.engine.addons``); what is method-specific is the model's contract
(``finegrain.models.base``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig
from finegrain.data.source import data_source
from finegrain.engine import distributed as fgdist
from finegrain.engine.addons import build_addons
from finegrain.engine.context import Context
from finegrain.engine.epochs import KeptEpoch, epoch_checkpoint, model_checkpoint, restore, save_epoch
from finegrain.engine.evaluate import evaluate
from finegrain.engine.kinds import build_task
from finegrain.engine.probe import probe_candidate, run_probe, write_recipe
from finegrain.engine.replan import replan_epochs
from finegrain.engine.setup import (
    freeze_bn_stats,
    load_run_data,
    make_optimizer,
    model_from_config,
    prepare_run_dir,
    rng_state,
    seed_everything,
    write_environment,
)  # fmt: skip
from finegrain.engine.task import Task, step
from finegrain.engine.tracking import RunTracker
from finegrain.env import configure_threads, intra_op_threads, resolve_amp
from finegrain.errors import CheckpointError, ConfigError
from finegrain.progress import progress_bar, say
from finegrain.run_layout import RunDir


@dataclass
class FitResult:
    run_dir: Path
    model: nn.Module  # the trained model, on every rank
    history: list[dict]  # one metrics row per epoch run in this call
    #: images per split as trained, after the data add-ons (pseudo-labelled images in, pruned labels out): split.csv
    #: lists only the dataset's own
    counts: dict[str, int] = field(default_factory=dict)


#: why ``--compile`` warns on a CPU (``python benchmarks/compile_speed.py``, AMD EPYC Zen 4, 2026-12-07)
COMPILE_ON_CPU = (
    "--compile on a CPU: measured no faster there (AMD EPYC Zen 4: lite0's whole-network step 0.87x eager, its last "
    "stages on cached maps 1.06x, after 33-77 s of compiling; benchmarks/compile_speed.py). It is meant for GPUs: "
    "drop --compile on this machine."
)
SYNC_EVERY = 10  # steps between reads of the running loss (the progress bar, the NaN check)
clock = time.perf_counter  # the wall clock --time-limit and --replan-epochs read (tests inject a slower machine)


def train_one_epoch(ctx: Context, task: Task, module, loader, optimizer, scheduler, ema, epoch: int) -> dict:
    cfg = ctx.cfg
    module.train()
    if cfg.model.freeze_bn_stats:
        freeze_bn_stats(module)
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, correct: kept where the model is
    count, steps, start = 0, len(loader), time.perf_counter()
    bar = progress_bar(loader, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", disable=not ctx.info.is_main, leave=False)
    for i, batch in enumerate(bar):
        loss, logits = step(ctx, task, module, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip_grad:
            nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        scheduler.step_update(epoch * steps + i + 1)
        if ema is not None:
            ema.update(task.trainable)
        y = batch[1].to(logits.device, non_blocking=True)
        sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double()])
        count += len(y)
        if i % SYNC_EVERY == 0 or i == steps - 1:  # reading a number waits for the GPU: not at every step
            mean_loss = sums[0].item() / count
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss is {mean_loss} at epoch {epoch + 1}: lower --lr or use --amp none")
            rate = count * ctx.info.world_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{rate:.1f}")
    stats = torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=sums.device)])
    fgdist.all_reduce_sum(stats)
    seconds = time.perf_counter() - start
    loss_sum, correct, count = stats.tolist()
    return {"train_loss": loss_sum / count, "train_acc": correct / count, "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": seconds, "samples_per_s": count / seconds}  # fmt: skip


def make_loaders(ctx: Context, task: Task):
    """What sets each epoch's order, the training loader (sharded across ranks) and the validation loader (sharded
    too), as the data source builds them (``finegrain.data.source``)."""
    cfg, info = ctx.cfg, ctx.info
    return data_source(ctx.index).loaders(task.train_set, task.val_set, cfg.optim.batch_size, task.workers,
                                          info.rank, info.world_size, cfg.run.seed)  # fmt: skip


def _resumed_config(cfg: TrainConfig | None, resume: str | Path,
                    state: Checkpoint | None = None) -> tuple[TrainConfig, Checkpoint]:  # fmt: skip
    """The saved run's config and its ``last.pt`` (``state``, when the caller has read it already)."""
    last = Path(resume) / RunDir.LAST
    if state is None and not last.is_file():
        raise CheckpointError(f"cannot resume: '{last}' does not exist (pass the run directory of a run)")
    state = state or Checkpoint.load(last)
    saved = state.train_config().replace(run_dir=str(resume))
    if cfg is not None and cfg.optim.epochs != saved.optim.epochs:
        saved = saved.replace(epochs=cfg.optim.epochs)  # the one setting that may change on resume: train longer
    return saved, state


def _last_of_this_job(run_dir: Path) -> Checkpoint | None:
    """``run_dir``'s ``last.pt`` when this torchrun job wrote it (this worker was restarted), else None."""
    job, last = fgdist.job_id(), run_dir / RunDir.LAST
    if job is None or not last.is_file():
        return None
    state = Checkpoint.load(last)
    return state if (state.resume or {}).get("job") == job else None


def fit(
    cfg: TrainConfig | None = None, resume: str | Path | None = None, on_epoch: Callable[[dict], None] | None = None
) -> FitResult:
    """Train as ``cfg`` says, or continue the run in ``resume`` from its ``last.pt``. ``on_epoch`` sees each
    epoch's metrics row once it is saved (a hyperparameter search prunes a trial by raising from it).

    A worker that torchrun restarted (``--max-restarts``, after a process or node died) continues its run from
    ``last.pt`` when the run has a fixed ``--run-dir`` and that ``last.pt`` was written by the same torchrun job:
    every node reads the same file, so every rank decides alike.

    Why one long function: it is the training algorithm read top to bottom (set up, probe, epochs, each epoch's
    step, validation, re-plan, save), and the epoch loop shares a dozen objects (loader, optimizer, scheduler, EMA,
    tracker, plan) that a split would pass around as arguments; the pieces with a job of their own live in
    ``setup.py``, ``task.py``, ``epochs.py``, ``probe.py`` and ``replan.py``."""
    last = None
    if resume is None and cfg is not None and cfg.run.run_dir:
        last = _last_of_this_job(Path(cfg.run.run_dir))
        resume = cfg.run.run_dir if last is not None else None
    if resume is not None:
        cfg, last = _resumed_config(cfg, resume, last)
    cfg = (cfg or TrainConfig()).validate()
    if cfg.recipe.budget:
        raise ConfigError("a time budget runs several trainings: call finegrain.engine.recipe.train_within_budget(cfg)"
                          " (what `finegrain train` does), or set budget to 0 or None")  # fmt: skip
    cfg.check_images_for_augmentation()
    device = fgdist.resolve_device(cfg.speed.device)
    info = fgdist.init_distributed(device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    threads = configure_threads()
    seed_everything(cfg.run.seed + info.rank)
    run_dir = prepare_run_dir(cfg, info)
    index = load_run_data(cfg, run_dir, last is not None, info)
    if last is not None and last.resume is None:  # a probe run: nothing was left to do
        if info.is_main:
            say(f"{run_dir} is complete (its head was solved by the probe): nothing to resume")
        return FitResult(run_dir, last.build_model().to(device), [], {sp: index.count(sp) for sp in ("train", "val")})
    model = model_from_config(cfg, index.classes).to(device)
    ctx = Context(cfg, device, info, run_dir, index, model, resolve_amp(cfg.speed.amp, device), build_addons(cfg))
    for addon in ctx.addons:
        addon.prepare(ctx)
    if info.is_main:
        env = write_environment(run_dir, cfg, ctx.amp, device, threads, info)
        where = env["cuda_devices"][device.index or 0] if device.type == "cuda" else env["cpu_model"]  # as recorded
        ctx.log(f"precision {env['amp_used']} (--amp {cfg.speed.amp}), {threads['intra_op_threads']} thread(s), "
                f"{cfg.speed.workers} loader worker(s) on {where}")  # fmt: skip
    counts = {sp: index.count(sp) for sp in ("train", "val", "test")}
    ctx.log(f"data: {index.format} '{cfg.dataset.data}': {len(index.classes)} classes, {counts}")
    if cfg.speed.channels_last:
        model.to(memory_format=torch.channels_last)
    loop_start = clock()  # --time-limit counts from here: building the task (a cache of maps) takes time too
    task = build_task(ctx)
    tracker = RunTracker(run_dir, cfg.run.log, cfg.run.tracking_uri) if info.is_main else None
    if tracker is not None:
        tracker.params(cfg.flat())  # by option name, as the command line names them
    probe = probe_candidate(ctx, task)
    if probe is not None and cfg.features.head == "probe":  # the head is solved, not trained: no epochs
        row = run_probe(ctx, task, *probe)
        if info.is_main:
            save_epoch(ctx, model_checkpoint(ctx, probe[0], row, 0), None, True, tracker)
            write_recipe(ctx, row, None)
            tracker.close()
        fgdist.barrier()
        return FitResult(run_dir, probe[0], [row], counts)
    seed_everything(cfg.run.seed + info.rank)  # the same training whether or not the feature cache was warm

    o, start_epoch = cfg.optim, last.epoch + 1 if last is not None else 0
    planned = o.epochs  # --epochs; with --replan-epochs, a resumed run continues its last plan
    if last is not None and cfg.recipe.replan_epochs:
        planned = last.resume.get("planned_epochs") or planned
    ctx.planned_epochs = planned
    for addon in ctx.addons:
        addon.epoch_start(ctx, task, start_epoch)
    sampler, loader, val_loader = make_loaders(ctx, task)
    module = task.trainable
    if info.enabled:
        module = DistributedDataParallel(module, find_unused_parameters=task.unused_parameters(model))
    if cfg.speed.compile:  # after DDP, as PyTorch's DDP + compile guide has it; checkpoints keep the plain module
        if device.type == "cpu" and info.is_main:
            warnings.warn(COMPILE_ON_CPU, stacklevel=2)
        module = torch.compile(module)
    optimizer = make_optimizer(task.trainable, cfg, model)
    steps = len(loader)
    scheduler = CosineLRScheduler(optimizer, t_initial=planned * steps, lr_min=o.min_lr, t_in_epochs=False,
                                  warmup_t=int(o.warmup_epochs * steps), warmup_lr_init=o.lr * 0.01)  # fmt: skip
    ema = ModelEmaV3(task.trainable, decay=cfg.averaging.ema_decay) if cfg.averaging.ema else None
    best = -math.inf
    if last is not None:
        best = restore(last.resume, task, optimizer, ema, ctx)
        ctx.log(f"resumed from {RunDir(run_dir).last} at epoch {start_epoch + 1}")
    keeper = KeptEpoch(cfg.optim.keep_epoch, last.resume.get("kept_epoch") if last is not None else None)

    history = []
    epoch = start_epoch
    cost = lambda e, n: math.prod(a.epoch_cost(e, n) for a in ctx.addons)  # noqa: E731  (replan_epochs' epoch costs)
    while epoch < planned:
        if history and not cfg.recipe.replan_epochs and _out_of_time(cfg, loop_start, history[-1]["epoch_seconds"]):
            ctx.log(f"--time-limit {cfg.recipe.time_limit:.1f} min: no time for epoch {epoch + 1}; {RunDir.BEST} "
                    "has the best validated epoch")  # fmt: skip
            break
        ctx.planned_epochs = planned
        if epoch > start_epoch and any([a.epoch_start(ctx, task, epoch) for a in ctx.addons]):
            sampler, loader, val_loader = make_loaders(ctx, task)
        steps_start = clock()  # the re-plan's epoch time leaves out an add-on's one-off work above (the mirror check)
        sampler.set_epoch(epoch)
        loader.generator.manual_seed((cfg.run.seed * 1_000_003 + epoch) * 1009 + info.rank)
        row = {"epoch": epoch + 1, **{k: v for a in ctx.addons for k, v in a.epoch_info(epoch).items()}}
        with intra_op_threads(task.threads):
            row.update(train_one_epoch(ctx, task, module, loader, optimizer, scheduler, ema, epoch))
        scheduler.step(epoch + 1)
        eval_module = ema.module if ema is not None else task.trainable
        m = None
        if val_loader is not None:
            m = evaluate(eval_module, val_loader, len(index.classes), device, amp=task.precision(ctx.amp),
                         channels_last=task.channels_last(cfg), keep_predictions=keeper.wants_answers)  # fmt: skip
            row.update({f"val_{k}": m[k] for k in ("n", "top1", "top5", "mean_class_acc", "loss")})
        if cfg.recipe.replan_epochs:  # rank 0's plan for every rank
            now = clock()
            mine = replan_epochs(60 * cfg.recipe.time_limit, now - loop_start,
                                 (now - steps_start) / cost(epoch, planned), epoch + 1, cost)  # fmt: skip
            planned = int(fgdist.all_reduce_sum(torch.tensor(float(mine if info.is_main else 0))).item())
            if planned * steps != scheduler.t_initial:
                ctx.log(f"epoch {epoch + 1} took {now - steps_start:.0f} s: {planned} epoch(s) now fit in "
                        f"--time-limit {cfg.recipe.time_limit:.1f} min")  # fmt: skip
                scheduler.t_initial = planned * steps  # the cosine schedule now ends with the new plan
            row["planned_epochs"] = planned
        score = row.get("val_top1", row["train_acc"])
        keeper.saw(epoch + 1, m, score, score >= best)
        rng = fgdist.all_gather_objects(rng_state())  # every rank's, so each resumes its own random stream
        if info.is_main:
            resume_state = {
                "trainable": task.trainable.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
                "ema": ema.state_dict() if ema is not None else None, "best": max(best, score),
                "addons": {a.name: a.state_dict() for a in ctx.addons}, "job": fgdist.job_id(),
                "planned_epochs": planned, "kept_epoch": keeper.state_dict(),
            }  # fmt: skip
            save_epoch(ctx, epoch_checkpoint(ctx, task, eval_module, row, epoch), resume_state, score >= best, tracker)
        best = max(best, score)
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        epoch += 1
    if (kept := keeper.finish(ctx)) is not None:  # --keep-epoch: best.pt is now the schedule's end
        best = kept
    if probe is not None and task.val_set is not None:  # --head auto: the probe too, and the better on validation
        row = run_probe(ctx, task, *probe)
        if row["val_top1"] > best:
            model = probe[0]
            if info.is_main:
                model_checkpoint(ctx, model, row).save(run_dir / RunDir.BEST)
        if info.is_main:
            write_recipe(ctx, row, best)
    if tracker is not None:
        tracker.close()
    fgdist.barrier()
    return FitResult(run_dir, model, history, counts)


def _out_of_time(cfg: TrainConfig, loop_start: float, epoch_seconds: float) -> bool:
    """Would another epoch (as long as the last) end past ``--time-limit``? Every rank gets the same answer."""
    if cfg.recipe.time_limit is None:
        return False
    late = torch.tensor(float(clock() - loop_start + epoch_seconds > 60 * cfg.recipe.time_limit))
    return fgdist.all_reduce_sum(late).item() > 0
