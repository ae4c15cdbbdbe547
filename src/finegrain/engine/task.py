"""What a training run optimises (``Task``), built two ways, and the training step.

- The image task trains the whole model (or a frozen backbone's head on fresh views) on augmented images.
- The feature task trains only the head on the frozen backbone's cached features of fixed views (plain and
  mirrored): rank 0 computes (or reads from the cache) once, the other ranks read the cache.

``step`` is one optimisation step's forward and loss: add-ons transform the batch and shape the criterion,
the method turns its training output into a loss (``FGVCModel.compute_loss``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset

from finegrain.config import TrainConfig
from finegrain.data import Sample
from finegrain.data.source import data_source
from finegrain.data.transforms import Preprocess, eval_transform, train_transform
from finegrain.engine import distributed as fgdist
from finegrain.engine.context import Context
from finegrain.engine.depthwise import fp32_depthwise
from finegrain.engine.evaluate import autocast, to_device
from finegrain.engine.features import extract_features
from finegrain.env import HEAD_THREADS
from finegrain.errors import ConfigError


@dataclass
class Task:
    """What one kind of training owns: what it trains, its datasets, and how its batches are computed (precision,
    memory layout, threads). Code outside this module asks the task, never which kind it is."""

    trainable: nn.Module  # the whole model (images) or its head (cached features)
    train_set: Dataset
    val_set: Dataset | None
    workers: int
    images: ClassVar[bool] = True  # what add-on hooks are told: batches are images (else cached features)
    threads: ClassVar[int | None] = None  # intra-op threads while it trains (None: as configured)
    solves_head: ClassVar[bool] = False  # whether the closed-form probe can stand in for its epochs

    def precision(self, amp: str) -> str:
        """The autocast precision of its forward passes, given the run's resolved ``amp``."""
        return amp

    def channels_last(self, cfg: TrainConfig) -> bool:
        return cfg.speed.channels_last

    def unused_parameters(self, model: nn.Module) -> bool:
        """Whether DDP must look for parameters a step leaves unused (methods that skip branches)."""
        return model.has_unused_parameters

    def as_input(self, x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
        """One sample batch laid out as the trainable module takes it."""
        return x.to(memory_format=torch.channels_last) if self.channels_last(cfg) else x


class ImageTask(Task):
    """The whole model (or a frozen backbone's head on fresh views) on augmented images, at the run's precision."""


class FeatureTask(Task):
    """The head alone on cached features: fp32 (a linear layer gains nothing from bf16), plain layout, and one
    intra-op thread (``env.HEAD_THREADS``: its products are tiny, and threads cost everything beside a neighbour)."""

    images = False
    threads = HEAD_THREADS
    solves_head = True

    def precision(self, amp: str) -> str:
        return "none"

    def channels_last(self, cfg: TrainConfig) -> bool:
        return False

    def unused_parameters(self, model: nn.Module) -> bool:
        return False


def augmentation(cfg: TrainConfig, pre: Preprocess):
    """The training images' augmentation the options ask for, at preprocessing ``pre`` (images and cached maps),
    its crops at ``--train-input-size`` where given."""
    a = cfg.augment
    if cfg.model.train_input_size:
        pre = replace(pre, input_size=cfg.model.train_input_size)
    return train_transform(
        pre, scale=(a.scale_min, 1.0), hflip=a.hflip, color_jitter=a.color_jitter, erasing=a.random_erasing,
        erasing_max_area=a.erasing_max_area, erasing_fill=a.erasing_fill, auto_augment=a.auto_augment,
    )  # fmt: skip


def image_datasets(ctx: Context) -> tuple[Dataset, Dataset | None]:
    """Training (augmented, with the method's extra targets) and validation image datasets at the model's
    current preprocessing."""
    cfg, model = ctx.cfg, ctx.model
    tf = augmentation(cfg, model.preprocess)
    for addon in ctx.addons:
        tf = addon.train_transform(tf)
    extra = model.extra_targets(ctx.index.part_names, cfg.dataset.data)
    if extra.get("part_groups") and cfg.augment.auto_augment:
        raise ConfigError(
            f"--auto-augment {cfg.augment.auto_augment} moves and turns images but not their part boxes, which "
            f"--method {cfg.model.method} trains on: drop --auto-augment for this method"
        )
    columns = lambda train: [c for a in ctx.addons for c in a.sample_columns(ctx, train, [False], images=True)]  # noqa: E731
    return data_source(ctx.index).train_val(
        tf, eval_transform(model.preprocess), extra, columns, cfg.optim.batch_size, ctx.info.rank,
        ctx.info.world_size, cfg.run.seed, cfg.dataset.skip_bad,
    )  # fmt: skip


def image_task(ctx: Context) -> Task:
    train_set, val_set = image_datasets(ctx)
    return ImageTask(ctx.model, train_set, val_set, workers=ctx.cfg.speed.workers)


def run_features(ctx: Context, samples: list[Sample], pre: Preprocess, flip: bool, desc: str,
                 model: nn.Module | None = None) -> torch.Tensor:  # fmt: skip
    """The backbone features of ``samples`` at ``pre`` of the run's model (or ``model``: a teacher), through the
    feature cache, with the run's precision, layout and loader workers."""
    cfg = ctx.cfg
    return extract_features(model or ctx.model, samples, pre, ctx.device, flip=flip, amp=ctx.amp,
                            channels_last=cfg.speed.channels_last, workers=cfg.speed.workers,
                            cache_dir=cfg.features.cache_dir, desc=desc)  # fmt: skip


def split_features(ctx: Context, pre: Preprocess, flips: list[bool]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The frozen backbone's features of the train split (one block per view in ``flips``) and of the val split
    (None when empty), at preprocessing ``pre``: rank 0 computes (or reads the cache) first, the others read it."""
    index = ctx.index

    def both() -> tuple[torch.Tensor, torch.Tensor | None]:
        train = torch.cat([run_features(ctx, index.split("train"), pre, f, "train") for f in flips])
        val = run_features(ctx, index.split("val"), pre, False, "val") if index.split("val") else None
        return train, val

    return fgdist.main_first(ctx.info, both)


def frozen_features(ctx: Context, samples: list[Sample], desc: str, option: str) -> torch.Tensor:
    """The run's starting backbone's features of ``samples`` at its own view, for an add-on that scores images
    before training (``option`` names it in the refusal); rank 0 computes and caches first."""
    cfg = ctx.cfg
    data_source(ctx.index).require_listed(f"{option} scores every training image before training",
                                          "use a local shard folder or the dataset itself")  # fmt: skip
    if not ctx.model.cacheable:
        raise ConfigError(f"{option} scores images with a probe on the backbone's features, which method "
                          f"'{cfg.model.method}' does not expose: train with --method baseline, or pass --init-from "
                          "a baseline checkpoint")  # fmt: skip

    return fgdist.main_first(ctx.info, lambda: run_features(ctx, samples, ctx.model.preprocess, False, desc))


def feature_task(ctx: Context) -> Task:
    """Frozen backbone: features of the train (plus mirrored) and val images, computed once by rank 0."""
    index = ctx.index
    labels = {sp: torch.tensor([s.label for s in index.split(sp)]) for sp in ("train", "val")}
    views = [False, True] if ctx.cfg.features.feature_flip and ctx.cfg.augment.hflip > 0 else [False]
    train_x, val_x = split_features(ctx, ctx.model.preprocess, views)
    columns = [c for addon in ctx.addons for c in addon.sample_columns(ctx, index.split("train"), views, images=False)]
    train_set = TensorDataset(train_x, labels["train"].repeat(len(views)), *columns)
    val_set = TensorDataset(val_x, labels["val"]) if val_x is not None else None
    return FeatureTask(ctx.model.head, train_set, val_set, workers=0)


def step(ctx: Context, task: Task, module: nn.Module, batch: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one batch and return (loss, logits): add-ons transform the batch and shape the criterion; the
    method turns what its training forward returns into the loss."""
    x = to_device(batch[0], ctx.device, task.channels_last(ctx.cfg))
    y = batch[1].to(ctx.device)
    for addon in ctx.addons:
        x = addon.batch(x, task.images)
    criterion = nn.CrossEntropyLoss(label_smoothing=ctx.cfg.optim.label_smoothing)
    for addon in ctx.addons:
        criterion = addon.criterion(criterion, x, batch, task.images)
    targets = batch[-1] if isinstance(batch[-1], dict) else None  # e.g. part boxes, for the method's loss
    precision = task.precision(ctx.amp)
    with fp32_depthwise(module, ctx.device, precision):  # (an add-on's forward too: --consistency)
        with autocast(ctx.device, precision):
            kw = {} if targets is None else {"targets": {k: v.to(ctx.device) for k, v in targets.items()}}
            out = module(x, **kw)
        return ctx.model.compute_loss(out, y, criterion)  # (the head alone gives logits: the default loss)
