"""The budgeted recipe (``finegrain train --budget MINUTES``): what the data needs, decided on its validation split
within a time budget on this machine.

0. Photos much smaller than the backbone's input (gtsrb's 32 px) are trained at a smaller input instead, unless
   ``--input-size`` is given (``data/image_sizes.py``).
1. The head on cached frozen features (``--head auto``: the probe and the epochs' head, the better on validation).
   Cheap on any CPU, and the start of everything else.
2. This machine's fine-tuning speed, measured (a few training steps at the run's input size and precision), gives
   the first plan of whole-network fine-tuning epochs (from the head, BatchNorm statistics frozen, on training crops
   of ``TRAIN_SIZE_RATIO`` of the test input) that fit in what is left of the budget; after each epoch the plan
   and its cosine schedule follow the speed the run actually has (``--replan-epochs``, engine/replan.py), so a
   machine that slows down or speeds up still ends near the budget, inside it where an epoch is under a tenth of it.
   Unless ``--hflip`` is given, whole-network fine-tuning decides mirroring from the data (``--mirror-check``,
   engine/addons/mirror_check.py).
3. Each stage keeps its schedule's end unless an earlier epoch validates better by more than the validation split's
   noise (``--keep-epoch auto``, engine/epochs.py: the best of many epochs' scores on 60-300 images is the luckiest).
   The fine-tuned stage becomes ``RUN_DIR/best.pt`` (with its split, config and curves) unless the head validates
   better beyond noise (engine/keep_stage.py); ``RUN_DIR/recipe.json`` records every stage's validation numbers and
   time, and why the one kept was kept.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from finegrain.atomic import write_text
from finegrain.checkpoint import Checkpoint
from finegrain.config import BY_HAND, TrainConfig
from finegrain.data.image_sizes import input_for, scaled_side, typical_side
from finegrain.data.loading import open_sample
from finegrain.data.stream import PREFIX as STREAM
from finegrain.engine import distributed as fgdist
from finegrain.engine.addons import ADDONS, build_addons
from finegrain.engine.addons.distill import DistillAddOn
from finegrain.engine.depthwise import fp32_depthwise
from finegrain.engine.evaluate import autocast, right, run_answers
from finegrain.engine.features import frozen_pass
from finegrain.engine.keep_stage import kept_stage
from finegrain.engine.replan import MAX_EPOCHS
from finegrain.engine.setup import dataset_index, freeze_bn_stats, run_dir_for
from finegrain.engine.task import augmentation
from finegrain.engine.train import FitResult, fit
from finegrain.engine.unlabeled_judge import fit_judged, judge_kind
from finegrain.env import resolve_amp
from finegrain.errors import BadImageError, ConfigError
from finegrain.models.backbone import backbone_preprocess, create_backbone
from finegrain.models.stages import stage_count
from finegrain.progress import say
from finegrain.run_layout import RunDir

#: the files of the kept stage that make RUN_DIR a run directory of its own, with what add-ons write there
STAGE_FILES = RunDir.STAGE_FILES + tuple(name for addon in ADDONS for name in addon.files)
EVAL_COST = 0.35  # validation images cost about a third of a training image (forward only, no augmentation)
#: the minutes ``finegrain train`` spends when no schedule is given. Why a budget by default: the head alone is the
#: cheapest recipe, not the best one ten minutes buy; on a held-out retail dataset (81 classes, AMD EPYC Zen 5, 2
#: cores) the head alone gave 73.8% and ``--budget 10`` 83.6%, and timm's script needed 19 minutes for 82.3%.
#: Where fine-tuning does not fit or validates worse, the recipe keeps the head (recipe.json says which).
DEFAULT_BUDGET = 10.0
#: seconds of the budget kept for what its fine-tuning clock does not see: the stage's set-up before its first epoch
#: and the recipe's end (the kept stage copied and loaded)
END_S = 10.0
#: partial fine-tuning's cut (``--train-stages``): the last stages trained on cached maps of the rest
PARTIAL_STAGES = 2
#: whole-network epochs that must fit for the recipe to prefer them to partial fine-tuning on cached maps. Why 12
#: (AMD EPYC Zen 5, 2 cores): cub100's default planned 7, 9 and 10 whole epochs in three runs (224 px crops, seed 0,
#: 2026-12-03; 176 px crops, seeds 1 and 0, 2026-12-04: 5, 7 and 7 ran) and validated 91.47, 90.78 and 91.13, below
#: the 24 epochs on maps that validated 92.49 (test 92.06) in the same 10 minutes; flowers17, tomato and gtsrb plan 20
#: or more whole epochs there (4 until 2026-12-03, 8 until 2026-12-04).
WHOLE_MIN_EPOCHS = 12
#: planned whole-network epochs from which the recipe cut-mixes ``RECIPE_CUTMIX`` of the batches (``--cutmix auto``):
#: in a long schedule a few hundred images are memorised early (tomato: training accuracy 1.00 from epoch ~18 of 38)
#: and the loss has little left to teach without it (``engine/addons/cutmix.py``). Why 30 (AMD EPYC Zen 5, the
#: default's runs, seeds 0-1, 2026-12-04, docs/frontier.md): planned 33-51 epochs, tomato and gtsrb validated
#: +5 of 120 and +2 of 420 images with it (test 94.33 -> 96.33 on both tomato seeds); planned 13-20, flowers17
#: validated 0 and -3 of 102 (seed 1 then kept the head: test 96.69 against 98.16)
CUTMIX_MIN_EPOCHS = 30
RECIPE_CUTMIX = 0.5
#: the wall clock the budget is counted on (``started`` is one of its readings); tests stop it, so that a plan is
#: decided by the speeds they mock and not by how fast or busy the machine running them is
clock = time.perf_counter
#: whole-network fine-tuning's training crops as a fraction of the input it is tested at (``--train-input-size``),
#: unless that is given. Why: a network trained on random-resized crops sees objects larger than a whole-image
#: resize shows them, and tests best at an input ~1.15-1.3x the one it trained at (Touvron et al. 2019, "Fixing the
#: train-test resolution discrepancy"; torchvision's recipes train at 176 and test at 224); and a crop of 0.8x the
#: side costs ~0.64x the time, so the budget buys ~1.5x the epochs. Before this, the default's runs tested better at
#: 32 px more than they trained at on all four domains (docs/frontier.md).
TRAIN_SIZE_RATIO = 0.8


def train_size(input_size: int) -> int:
    """The recipe's training crop for a test input of ``input_size`` px: ``TRAIN_SIZE_RATIO`` of it, in 16 px."""
    return scaled_side(input_size, TRAIN_SIZE_RATIO)


def budget_for(cfg: TrainConfig, given: Iterable[str] = ()) -> tuple[float, str]:
    """The minutes the recipe gets for ``cfg`` (0: none, ``fit`` runs the options as given) and why, where
    ``given`` names the options the user set (the rest are defaults)."""
    given = set(given)
    if "budget" in given or cfg.recipe.budget is not None:
        return cfg.recipe.budget or 0.0, "--budget given"
    if hand := [name for name in BY_HAND if name in given]:
        return 0.0, f"--{hand[0].replace('_', '-')} given: the options run as given (--budget N adds the recipe)"
    if cfg.model.method != "baseline":
        return 0.0, f"the default budget is for the baseline method; --method {cfg.model.method} runs as given"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 0.0, "the budget decides from one process's timing; under torchrun the options run as given"
    if not cfg.dataset.val_fraction:
        return 0.0, "the recipe chooses on the validation split, and --val-fraction is 0"
    return DEFAULT_BUDGET, "default"


def train(cfg: TrainConfig, given: Iterable[str] = (), started: float | None = None) -> FitResult:
    """``finegrain train``: the recipe within the budget that :func:`budget_for` gives, else ``fit`` as given;
    ``started``: the ``time.perf_counter()`` the budget counts from (the command's start; default now)."""
    budget, why = budget_for(cfg, given)
    if budget:
        decide_flips = not {"hflip", "mirror_check"} & set(given)  # mirroring from the data, unless the user said
        keep = cfg.optim.keep_epoch if "keep_epoch" in given else "auto"  # the schedule's end, unless noise says
        return train_within_budget(cfg.replace(budget=budget, mirror_check=decide_flips or cfg.augment.mirror_check,
                                               keep_epoch=keep), started)  # fmt: skip
    if cfg.recipe.budget is None:
        say(f"budget: none ({why})")
    cfg = cfg.replace(budget=None)
    if cfg.labels.unlabeled is not None:
        judge, why = judge_kind(cfg)
        say(f"--unlabeled: the {judge} judge decides whether they help ({why})")
        if judge == "finetune":
            return fit_judged(cfg)
    return fit(cfg)


def finetune_speed(model: nn.Module, num_classes: int, cfg: TrainConfig, device: torch.device, steps: int = 3,
                   teachers: Sequence[nn.Module] = (), train_stages: int = 0,
                   compiled: bool = False) -> float:  # fmt: skip
    """Training images/s of fine-tuning on this machine, at the run's batch, training input size and precision: of the
    whole network on images, or (``train_stages``) of its last stages and head on the cached maps of the frozen rest;
    ``teachers`` (distillation's) run on every batch too. One step to warm up, then the fastest of ``steps`` timed
    ones. Without the teachers' pass, a cub100 student with two teachers planned one epoch of 124 s that took 221 s,
    and its 5-minute run took 6 (2026-11-29, docs/unlabeled.md).

    The fastest, not the mean: a step slowed by other work on the machine must not cancel fine-tuning. On a loaded
    2-core machine (2026-11-28) the mean of 3 steps read 4.6-7.3 img/s against 15-18 idle, and the recipe then
    kept the head on two of four datasets. An estimate that is too high costs at most one epoch: ``--time-limit``
    stops before any later epoch that would end past the budget, but the first one always runs.

    ``compiled`` times the step ``torch.compile``'d (its compile in the untimed warm-up), for
    benchmarks/compile_speed.py. The recipe's probes stay eager even under ``--compile``: compiling there would cost
    a budget a compile per probe (33-77 s each on a Zen 4, a minute on a GPU), and the re-plans after each epoch
    read the speed training has (the first epoch's time includes its compile)."""
    model = model.to(device).train()
    if cfg.speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    size = model.preprocess.input_size if train_stages else cfg.model.train_input_size or model.preprocess.input_size
    batch, amp = cfg.optim.batch_size, resolve_amp(cfg.speed.amp, device)
    x = torch.randn(batch, 3, size, size, device=device)
    if cfg.speed.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    model.requires_grad_(True)
    module = model
    if train_stages:
        lower, module = model.split_stages(train_stages)  # (freezes the lower stages)
        with torch.no_grad(), autocast(device, amp):  # not inference mode: the step's 'same' padding saves them
            x = lower.eval()(x).float().clone()  # a batch of maps, as the cache gives them
    freeze_bn_stats(module)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
    y = torch.randint(0, num_classes, (batch,)).to(device)
    stepped = torch.compile(module) if compiled else module  # compiled in the untimed warm-up step

    def one_step() -> None:
        with autocast(device, amp), fp32_depthwise(stepped, device, amp):  # as the training step computes
            with torch.no_grad():
                for teacher in teachers:
                    teacher(x)
            out = stepped(x)
        loss, _ = model.compute_loss(out, y, nn.functional.cross_entropy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / fastest_seconds(one_step, steps)


def fastest_seconds(step: Callable[[], object], steps: int) -> float:
    """The fastest of ``steps`` timed calls of ``step``, after one untimed call that warms up."""
    step()
    fastest = math.inf
    for _ in range(steps):
        start = time.perf_counter()
        step()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


@torch.inference_mode()
def cache_speed(model: nn.Module, cfg: TrainConfig, device: torch.device, train_stages: int, steps: int = 2) -> float:
    """Images/s of the frozen lower stages' forward pass, the cost of caching one view (decoding not counted)."""
    model = model.to(device).eval()
    lower, _ = model.split_stages(train_stages)
    size = model.preprocess.input_size
    lower = frozen_pass(lower, lambda m, t: m(t), size, device, cfg.speed.amp, cfg.speed.channels_last)
    x = torch.randn(cfg.optim.batch_size, 3, size, size, device=device)
    if cfg.speed.channels_last:  # as the cache computes them
        x = x.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with autocast(device, resolve_amp(cfg.speed.amp, device)):
            lower(x)

    return len(x) / fastest_seconds(forward, steps)


def loading_seconds(cfg: TrainConfig, pre, samples: Sequence, n: int = 16) -> float:
    """Seconds per image of decoding and augmenting training images (the mean over the first ``n``, one thread): the
    loader's share of a whole-network epoch, which the step probe does not see. Its workers share the cores the steps
    use, so the plan adds it in full. Why: without it, epochs took 1.2-1.5x the plan (AMD EPYC Zen 5, 2 cores,
    2026-12-04: tomato 14 s against 9.3, flowers17 23-25 s against 19.4, cub100 65 s against 47.3), and cub100's
    plan of 10 whole-network epochs (7 ran, validation 91.13) was chosen over 27 on cached maps that validate higher.
    An image that does not decode is left out here: the run itself refuses or skips it (``--skip-bad``)."""
    transform, took, done = augmentation(cfg, pre), 0.0, 0
    for sample in list(samples)[:n]:
        start = time.perf_counter()
        try:
            transform(open_sample(sample))
        except BadImageError:
            continue
        took, done = took + time.perf_counter() - start, done + 1
    return took / max(done, 1)


def plan_finetuning(left_s: float, n_train: int, n_val: int, whole_img_s: float, stages_img_s: float,
                    cache_s: Callable[[int], float], max_views: int, val_area: float = 1.0,
                    load_s: float = 0.0) -> dict:  # fmt: skip
    """Which fine-tuning the seconds left buy, from measured speeds: the whole network where at least
    ``WHOLE_MIN_EPOCHS`` of its epochs fit; else the last ``PARTIAL_STAGES`` stages on cached maps where one of its
    epochs fits after the cache (``cache_s(views)`` seconds); else whole-network epochs where one fits; else none.
    ``val_area``: a validation image's pixels over a whole-network training crop's (they are smaller); ``load_s``:
    seconds to decode and augment one image, which every whole-network epoch pays again (the cache pays it once).

    The cache holds as many views as epochs fit, up to ``max_views``: an epoch draws one view per image, so a view
    that no epoch could draw is time taken from the epochs (on cub100 4 views cost ~3 of the 6 minutes left)."""
    whole_epoch_s = (n_train + EVAL_COST * val_area * n_val) / whole_img_s + load_s * (n_train + n_val)
    stages_epoch_s = (n_train + EVAL_COST * n_val) / stages_img_s
    whole = min(math.floor(left_s / whole_epoch_s), MAX_EPOCHS)

    def fit(views: int) -> int:
        return min(math.floor((left_s - cache_s(views)) / stages_epoch_s), MAX_EPOCHS) if cache_s(views) < left_s else 0

    views = next((v for v in range(max_views, 0, -1) if fit(v) >= v), 1)
    stages = fit(views)
    if whole >= WHOLE_MIN_EPOCHS or (stages < 1 <= whole):
        kind, epochs, epoch_s = "whole", whole, whole_epoch_s
    else:
        kind, epochs, epoch_s = ("stages", stages, stages_epoch_s) if stages >= 1 else ("none", 0, whole_epoch_s)
    return {"kind": kind, "train_stages": PARTIAL_STAGES if kind == "stages" else 0, "finetune_epochs": max(epochs, 0),
            "estimated_epoch_s": round(epoch_s, 1), "whole_epochs_fit": max(whole, 0),
            "stages_epochs_fit": max(stages, 0), "map_views": views if kind == "stages" else 0,
            "cache_s": round(cache_s(views), 1) if kind == "stages" else None}  # fmt: skip


def head_config(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """The first stage of the recipe: the head on cached features of the frozen backbone (``--head auto``); the
    image-level augmentations asked for (``--random-erasing``, ``--auto-augment`` ...) and ``--train-on-val`` are
    for the fine-tuning (the head's validation stays held out: it decides the stages' plan)."""
    return cfg.without_image_level().replace(
        run_dir=str(run_dir), freeze_backbone=True, cache_features=True, budget=None, train_on_val=False
    )


def partial_allowed(cfg: TrainConfig, head_best: Checkpoint) -> bool:
    """Can the recipe fine-tune part of this network on cached maps? The baseline on a backbone cut at stages
    (timm's EfficientNet family), with no add-on that shapes training (they work on images or features; those that
    only choose the training images, such as ``--unlabeled``'s pseudo-labels, are cached like the rest), and no
    ``--train-input-size`` given (it crops whole images; the maps are cached at the test input)."""
    shaping = any(not a.data_only for a in build_addons(cfg))
    whole_images = cfg.model.train_input_size is not None
    return (head_best.method == "baseline" and not shaping and not whole_images
            and stage_count(head_best.build_model().backbone) > 0)  # fmt: skip


def finetune_config(cfg: TrainConfig, head_best: Checkpoint, epochs: int, run_dir: Path,
                    time_limit: float | None = None, train_stages: int = 0,
                    map_views: int | None = None) -> TrainConfig:  # fmt: skip
    """The fine-tuning stage of the recipe from the head's best checkpoint, for ``epochs``: the whole network, or its
    last ``train_stages`` stages on cached maps."""
    return cfg.replace(
        run_dir=str(run_dir), init_from=str(head_best.path), freeze_backbone=False, epochs=epochs,
        train_stages=train_stages, map_views=map_views or cfg.features.map_views,
        lr=cfg.recipe.finetune_lr, warmup_epochs=min(1.0, 0.25 * epochs), budget=None,
        crop_pct=head_best.preprocess.crop_pct,  # the view the head was chosen with
        time_limit=time_limit, replan_epochs=time_limit is not None,  # the plan follows the speed the run has
    )  # fmt: skip


def with_cutmix(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """Whole-network fine-tuning for ``epochs``: cut-mixed (``RECIPE_CUTMIX``) from ``CUTMIX_MIN_EPOCHS`` where
    ``--cutmix`` is auto and the loss allows it (not with distillation or center loss); as given otherwise."""
    if cfg.augment.cutmix is not None or epochs < CUTMIX_MIN_EPOCHS:
        return cfg
    try:
        return cfg.replace(cutmix=RECIPE_CUTMIX, freeze_backbone=False)  # (the fine-tuning stage's backbone)
    except ConfigError as e:
        say(f"budget: no CutMix: {e}")
        return cfg


def small_photos(cfg: TrainConfig, train: Sequence | None) -> tuple[TrainConfig, dict]:
    """The run at a smaller input where its ``train`` photos (None: a stream, read once by the run) are much smaller
    than the backbone's input (and no ``--input-size`` was given): ``data/image_sizes.py`` says why and how much;
    what was decided, for recipe.json."""
    if cfg.model.input_size is not None or train is None:
        return cfg, {}
    side = typical_side(train)
    native = backbone_preprocess(create_backbone(cfg.model.backbone, pretrained=False)).input_size
    size = input_for(side, native)
    if size >= native:
        return cfg, {}
    say(f"budget: the training photos are ~{side} px (median longer side): training at {size} px instead of "
        f"{native} (more epochs in the budget; --input-size {native} to keep it)")  # fmt: skip
    return cfg.replace(input_size=size), {"input_size": size, "photo_side": side, "native_input_size": native}


def validation_right(run_dir: str, workers: int) -> list[bool]:
    """Which validation images a stage's ``best.pt`` answers right, in split order."""
    return right(run_answers(run_dir, "val", workers))


def train_within_budget(cfg: TrainConfig, started: float | None = None) -> FitResult:
    """Head, then fine-tuning for what the budget leaves; the fine-tuned network is the run's result unless the head
    validates better beyond noise (engine/keep_stage.py). The budget counts from ``started`` (a
    ``clock()``; default now): the command line passes its process's start."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--budget decides from one process's timing: run it without torchrun (or set --epochs)")
    budget_s = 60 * cfg.recipe.budget
    start = clock() if started is None else started
    run_dir = run_dir_for(cfg)
    stages: dict[str, dict] = {}

    # the training images, read before the runs for their sizes and loading time (a stream is read once, by the run)
    train = None if str(cfg.dataset.data).startswith(STREAM) else dataset_index(cfg).split("train")
    cfg, sized = small_photos(cfg, train)
    head = fit(head_config(cfg, run_dir / "head"))
    head_best = Checkpoint.load(head.run_dir / RunDir.BEST)
    stages["head"] = {"val_top1": (head_best.metrics or {}).get("val_top1"), "seconds": clock() - start,
                      "run_dir": str(head.run_dir)}  # fmt: skip
    if stages["head"]["val_top1"] is None:
        raise ConfigError("--budget chooses on the validation split: set --val-fraction above 0 (e.g. 0.1)")

    device = fgdist.resolve_device(cfg.speed.device)
    test_size = head_best.preprocess.input_size
    whole_cfg = cfg if cfg.model.train_input_size else cfg.replace(train_input_size=train_size(test_size))
    online = DistillAddOn.wanted(cfg) and DistillAddOn.online(cfg)  # distilling online: they run on every batch
    teachers = cfg.distill.teachers if online else []
    speed = finetune_speed(head_best.build_model(), len(head_best.classes), whole_cfg, device,
                           teachers=[Checkpoint.load(t).build_model().to(device).eval() for t in teachers])  # fmt: skip
    n_train, n_val = head.counts["train"], head.counts["val"]  # as trained: pseudo-labelled images count
    n_train += n_val if cfg.labels.train_on_val else 0  # the fine-tuning trains on them too (its head did not)
    stages_speed, cache_s = 1e-9, lambda views: math.inf  # partial fine-tuning: the baseline's EfficientNets
    if partial_allowed(cfg, head_best):
        stages_speed = finetune_speed(head_best.build_model(), len(head_best.classes), cfg, device,
                                      train_stages=PARTIAL_STAGES)  # fmt: skip
        view_s = 1 / cache_speed(head_best.build_model(), cfg, device, PARTIAL_STAGES)
        per_image = stages["head"]["seconds"] / (2 * n_train + n_val)  # decoding + a forward pass, from the head

        def cache_s(views: int) -> float:
            return (views * n_train + n_val) * view_s + per_image * (n_train + n_val)

    crop = whole_cfg.model.train_input_size
    load_s = 0.0 if train is None else loading_seconds(whole_cfg, head_best.preprocess, train)
    left = budget_s - (clock() - start) - END_S
    plan = plan_finetuning(left, n_train, n_val, speed, stages_speed, cache_s, cfg.features.map_views,
                           val_area=(test_size / crop) ** 2, load_s=load_s)  # fmt: skip
    epochs, epoch_s = plan["finetune_epochs"], plan["estimated_epoch_s"]
    decision = {"train_images": n_train, "finetune_img_s": round(speed, 1), "stages_img_s": round(stages_speed, 1),
                "seconds_left": round(left, 1), "load_ms": round(1000 * load_s, 1), **plan,
                "teachers_per_batch": len(teachers), **sized,
                "train_input_size": crop if plan["kind"] == "whole" else test_size}  # fmt: skip
    if plan["kind"] == "whole":
        cfg = whole_cfg
        cfg = with_cutmix(cfg, epochs)
    decision["cutmix"] = cfg.augment.cutmix or 0.0
    if epochs >= 1:
        mixed = f", {cfg.augment.cutmix:g} of the batches cut-mixed" if cfg.augment.cutmix else ""
        what = (f"the whole network on {crop} px crops (tested at {test_size}{mixed})" if plan["kind"] == "whole"
                else f"the last {plan['train_stages']} stages on maps")  # fmt: skip
        say(f"budget: {left / 60:.1f} of {cfg.recipe.budget:g} min left, fine-tuning {what}: "
            f"{epochs} epoch(s) of ~{epoch_s / 60:.1f} min")  # fmt: skip
        if cfg.labels.consistency and plan["kind"] == "whole":
            say("--consistency trains on cached maps, and the whole network fits the budget here: not used")
        ft_start = clock()
        ft = fit(finetune_config(cfg, head_best, epochs, run_dir / "finetune", time_limit=left / 60,
                                 train_stages=plan["train_stages"], map_views=plan["map_views"]))  # fmt: skip
        plans = [r.get("planned_epochs", epochs) for r in ft.history]  # (absent where --replan-epochs is off)
        replans = [
            {"after_epoch": r["epoch"], "planned_epochs": now}
            for r, now, before in zip(ft.history, plans, [epochs, *plans], strict=False)
            if now != before
        ]
        kept_ft = Checkpoint.load(ft.run_dir / RunDir.BEST) if ft.history else None  # the epoch --keep-epoch kept
        stages["finetune"] = {"val_top1": (kept_ft.metrics or {}).get("val_top1") if kept_ft else None,
                              "kept_epoch": kept_ft.epoch + 1 if kept_ft and kept_ft.epoch is not None else None,
                              "seconds": clock() - ft_start, "epochs": len(ft.history),
                              "kind": plan["kind"], "replans": replans, "run_dir": str(ft.run_dir)}  # fmt: skip
        if (ft.run_dir / RunDir.MIRROR).is_file():  # --mirror-check: the mirror pairs found, the mirroring used
            mirror = json.loads((ft.run_dir / RunDir.MIRROR).read_text())
            stages["finetune"]["mirror"] = {"hflip": mirror["hflip"], "pairs": [p["names"] for p in mirror["pairs"]]}
    kept, why = kept_stage(stages, lambda stage: validation_right(stages[stage]["run_dir"], cfg.speed.workers))
    if stages.get("finetune", {}).get("val_top1") is None:
        why = f"no fine-tuning epoch fits in the {left / 60:.1f} min left (one takes ~{epoch_s / 60:.1f} min here)"
    for name in STAGE_FILES:
        source = Path(stages[kept]["run_dir"]) / name
        if source.is_file():
            shutil.copy2(source, run_dir / name)
    recipe = {"budget_min": cfg.recipe.budget, "stages": stages, "decision": decision, "kept": kept, "why": why,
              "total_s": round(clock() - start, 1)}  # fmt: skip
    if (run_dir / RunDir.UNLABELED).is_file():  # --unlabeled's guard: whether the kept stage used them, and why
        report = json.loads((run_dir / RunDir.UNLABELED).read_text())
        recipe["unlabeled"] = {"fraction": report["fraction"], "pseudo_labelled": len(report["pseudo_labelled"]),
                               "why": report["why"]}  # fmt: skip
    write_text(run_dir / RunDir.RECIPE, json.dumps(recipe, indent=2))
    say(f"recipe: kept {kept}: {why}; {recipe['total_s'] / 60:.1f} of {cfg.recipe.budget:g} min used")
    history = ft.history if kept == "finetune" else head.history
    return FitResult(run_dir, Checkpoint.load(run_dir / RunDir.BEST).build_model(), history, head.counts)
