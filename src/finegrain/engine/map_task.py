"""Partial fine-tuning on cached mid-level maps (``--no-freeze-backbone --train-stages N``): the third task kind.

The backbone's first stages stay frozen; their output maps are computed once per run for ``--map-views``
augmented views of each training image (and the plain view of each validation image), and the epochs train only the
last ``N`` stages and the head on those maps, each epoch drawing one cached view per image. A step then pays neither
the image decoding nor the high-resolution lower stages, forward or backward.

The cache lives in memory (at most ``MAX_CACHE_BYTES``; fewer views where more would not fit) and is computed from a
generator seeded by the run's seed, so ``--resume`` rebuilds the same maps and continues exactly. The last cache
built in a process is kept for the next run in it that would build the same one (same lower-stage weights, images,
views, augmentation, seed and precision): a learning-rate sweep or ``finegrain tune``'s trials pay for it once.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from finegrain.data import ImageDataset, Sample
from finegrain.data.source import data_source
from finegrain.data.transforms import eval_transform
from finegrain.engine.context import Context
from finegrain.engine.evaluate import autocast, to_device
from finegrain.engine.features import file_key, frozen_pass, state_digest
from finegrain.engine.task import Task, augmentation
from finegrain.errors import ConfigError
from finegrain.progress import progress_bar

#: the most memory the cached maps of one run may take: 4 GiB holds 4 views of ~24,000 images cut before lite0's
#: last two stages in bf16 (112 x 14 x 14 values per view at 224 px)
MAX_CACHE_BYTES = 4 * 2**30
#: the last cache built in this process: {"key": what it was built from, "maps": (train, val)}
_LAST: dict = {}


@dataclass
class MapTask(Task):
    """The upper stages and the head on cached maps of the frozen lower stages, at the run's precision. ``lower``,
    ``augment`` and ``dtype`` let an add-on cache maps of more images the same way (``maps``)."""

    lower: nn.Module | None = None
    augment: Callable | None = None
    dtype: torch.dtype = torch.float32

    def maps(self, ctx: Context, samples: list[Sample], views: int, desc: str, augmented: bool = True) -> torch.Tensor:
        """(views, len(samples), C, h, w): the frozen stages' maps of augmented (else plain) views of ``samples``."""
        tf = self.augment if augmented else eval_transform(ctx.model.preprocess)
        return compute_maps(ctx, self.lower, samples, tf, views, desc, self.dtype)


class Views:
    """``n`` independently augmented views of one image, stacked: (n, 3, H, W)."""

    def __init__(self, transform, n: int) -> None:
        self.transform, self.n = transform, n

    def __call__(self, img) -> torch.Tensor:
        return torch.stack([self.transform(img) for _ in range(self.n)])


class CachedMaps(Dataset):
    """Item ``i``: one of image ``i``'s cached views (drawn from the torch random stream, which a checkpoint saves)
    as fp32, and its label."""

    def __init__(self, maps: torch.Tensor, labels: torch.Tensor) -> None:
        self.maps, self.labels = maps, labels  # maps: (views, images, C, h, w)

    def __len__(self) -> int:
        return self.maps.shape[1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        v = int(torch.randint(len(self.maps), ())) if len(self.maps) > 1 else 0
        return self.maps[v, i].float(), self.labels[i]


def map_shape(lower: nn.Module, size: int, device: torch.device) -> tuple[int, ...]:
    with torch.inference_mode():
        return tuple(lower.eval()(torch.zeros(1, 3, size, size, device=device)).shape[1:])


@torch.inference_mode()
def compute_maps(ctx: Context, lower: nn.Module, samples: list[Sample], transform, views: int, desc: str,
                 dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """``lower``'s maps of ``views`` views of each of ``samples``: (views, len(samples), C, h, w), the same for the
    same seed (its own generator; the run's random stream is left as it was)."""
    cfg = ctx.cfg
    lower = frozen_pass(lower, lambda m, x: m(x), ctx.model.preprocess.input_size, ctx.device, ctx.amp,
                        cfg.speed.channels_last)  # fmt: skip
    dataset = ImageDataset(samples, Views(transform, views))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        loader = DataLoader(dataset, batch_size=max(1, cfg.optim.batch_size // views), num_workers=cfg.speed.workers,
                            generator=torch.Generator().manual_seed(cfg.run.seed))  # fmt: skip
        chunks = []
        for x, _ in progress_bar(loader, desc=desc, unit="batch", disable=not ctx.info.is_main):
            b = len(x)
            x = to_device(x.flatten(0, 1), ctx.device, cfg.speed.channels_last)
            with autocast(ctx.device, ctx.amp):
                m = lower(x)
            chunks.append(m.to("cpu", dtype).contiguous().view(b, views, *m.shape[1:]).transpose(0, 1))
    return torch.cat(chunks, dim=1)


def map_task(ctx: Context) -> Task:
    """Cut the model at ``--train-stages``, cache the lower stages' maps of the training views and validation images,
    and train the upper stages with the head on them."""
    cfg, model, index = ctx.cfg, ctx.model, ctx.index
    data_source(ctx.index).require_listed("partial fine-tuning on cached maps (--train-stages)",
                                          "fine-tune the whole network (--train-stages 0), or train from a local "
                                          "shard folder")  # fmt: skip
    if shaping := [a.name for a in ctx.addons if not (a.data_only or a.on_maps)]:
        raise ConfigError(f"--train-stages trains on cached maps, and add-on(s) {', '.join(shaping)} work on images or "
                          "features: drop them, or fine-tune the whole network (--train-stages 0)")  # fmt: skip
    lower, upper = model.split_stages(cfg.model.train_stages)
    train, val = index.split("train"), index.split("val")
    dtype = torch.float32 if ctx.amp == "none" else torch.bfloat16
    shape = map_shape(lower, model.preprocess.input_size, ctx.device)
    per_image = math.prod(shape) * dtype.itemsize
    views = min(cfg.features.map_views, (MAX_CACHE_BYTES - len(val) * per_image) // (len(train) * per_image))
    if views < 1:
        raise ConfigError(
            f"the maps of {len(train)} training images at --train-stages {cfg.model.train_stages} "
            f"take {len(train) * per_image / 2**30:.1f} GiB a view, over the "
            f"{MAX_CACHE_BYTES / 2**30:.0f} GiB cache: "
            "train fewer stages (smaller maps), or fine-tune the whole network (--train-stages 0)"
        )
    tf = augmentation(cfg, model.preprocess)
    views = int(views)
    ctx.log(f"caching maps {list(shape)} of the frozen backbone stages: {views} view(s) of {len(train)} training "
            f"images, {len(val)} validation images")  # fmt: skip
    labels = {sp: torch.tensor([s.label for s in index.split(sp)]) for sp in ("train", "val")}
    key = hashlib.sha1(json.dumps([state_digest(lower), model.preprocess.to_dict(), views, cfg.augment.__dict__,
                                   cfg.run.seed, str(dtype), [file_key(s) for s in train + val]],
                                  default=str).encode()).hexdigest()  # fmt: skip
    if _LAST.get("key") != key:
        _LAST.clear()  # the old cache's memory first
        train_maps = compute_maps(ctx, lower, train, tf, views, f"maps (train, {views} views)", dtype)
        val_maps = (
            compute_maps(ctx, lower, val, eval_transform(model.preprocess), 1, "maps (val)", dtype) if val else None
        )
        _LAST.update(key=key, maps=(train_maps, val_maps))
    else:
        ctx.log("the same maps as the last run in this process: reused")
    train_maps, val_maps = _LAST["maps"]
    val_set = CachedMaps(val_maps, labels["val"]) if val else None
    return MapTask(upper, CachedMaps(train_maps, labels["train"]), val_set, workers=0, lower=lower, augment=tf,
                   dtype=dtype)  # fmt: skip
