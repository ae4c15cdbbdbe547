"""Where a run's images come from, as one object: listed images (folders, CUB, manifests, a local shard folder) or
shards streamed in order (``wds:``). It builds the datasets and loaders and says what the data allows.

Why an object: "listed or streamed" was decided by ``index.stream is not None`` or ``isinstance(StreamDataset)`` at
nine places in five files of the engine and the reports (the house issue); each new use of the data had to know
both kinds. Now they ask :func:`data_source` and call the same methods on either kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from finegrain.data.loading import ImageDataset, find_bad_images
from finegrain.data.records import DatasetIndex
from finegrain.data.stream import StreamDataset
from finegrain.errors import ConfigError


class ListedSource:
    """Images known by name before training: they can be cached as features, scored one by one before training,
    checked for bad files up front and shown as thumbnails."""

    listed = True

    def __init__(self, index: DatasetIndex) -> None:
        self.index = index

    def require_listed(self, what: str, fix: str) -> None:
        """Nothing to refuse: every image is known by name."""

    def train_val(self, train_tf: Callable, val_tf: Callable, extra: dict, columns: Callable, batch_size: int,
                  rank: int, world_size: int, seed: int, skip_bad: bool) -> tuple[Dataset, Dataset | None]:  # fmt: skip
        """The training dataset (``train_tf``, the method's ``extra`` targets, the add-ons' per-sample ``columns``
        of the training samples) and the validation dataset (None when the split is empty)."""
        val, train = self.index.split("val"), self.index.split("train")
        val_set = ImageDataset(val, val_tf) if val else None
        return ImageDataset(train, train_tf, **extra, columns=columns(train)), val_set

    def evaluation(
        self, split: str, transform: Callable, skip_bad: bool, workers: int
    ) -> tuple[Dataset, int, int, list]:
        """(dataset, loader workers, images skipped as unreadable, the samples in loader order) of one split."""
        samples, skipped = self.index.split(split), 0
        if skip_bad:
            bad = {s.key for s, _ in find_bad_images(samples)}
            samples, skipped = [s for s in samples if s.key not in bad], len(bad)
        return ImageDataset(samples, transform), workers, skipped, samples

    def loaders(self, train_set: Dataset, val_set: Dataset | None, batch_size: int, workers: int, rank: int,
                world_size: int, seed: int) -> tuple:  # fmt: skip
        """(what sets each epoch's order, the training loader, the validation loader): a DistributedSampler shards
        the training images across ranks, each rank validates every world_size-th image."""
        drop_last = len(train_set) >= batch_size * world_size * 2
        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=drop_last)  # fmt: skip
        # Workers are started each epoch from a generator seeded by (seed, epoch, rank), so the random augmentation
        # of epoch e is the same whether the run got there straight or through --resume. (Persistent workers carry
        # their RNG from epoch to epoch, outside anything a checkpoint can save: resume differed in 149 of 296
        # tensors with them.)
        loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, num_workers=workers,
                            drop_last=sampler.drop_last, generator=torch.Generator())  # fmt: skip
        val_loader = None
        if val_set is not None:
            shard = Subset(val_set, range(rank, len(val_set), world_size))
            val_loader = DataLoader(shard, batch_size=batch_size * 2, num_workers=workers)
        return sampler, loader, val_loader


class StreamedSource(ListedSource):
    """Shards read in order (``finegrain.data.stream``): counted, never listed, so whatever needs every image by
    name before training (cached features, scoring, a bad-file check, thumbnails) is refused with the fix."""

    listed = False

    def require_listed(self, what: str, fix: str) -> None:
        raise ConfigError(f"{what}, which streamed shards (wds:) do not allow: {fix}")

    def train_val(self, train_tf, val_tf, extra, columns, batch_size, rank, world_size, seed, skip_bad):
        """Each rank its own training shards for the same number of steps, and its validation shards."""
        stream = self.index.stream
        steps = max(1, math.ceil(stream.count("train") / (world_size * batch_size)))
        common = dict(rank=rank, world_size=world_size, seed=seed, skip_bad=skip_bad)
        load = ImageDataset([], train_tf, **extra).load
        train = StreamDataset(stream, "train", load, steps=steps, batch_size=batch_size, **common)
        val_load = ImageDataset([], val_tf).load
        val = StreamDataset(stream, "val", val_load, **common) if stream.count("val") else None
        return train, val

    def evaluation(self, split, transform, skip_bad, workers):
        """Read in order; ``skip_bad`` names each skipped image as it goes; a worker needs a shard of its own."""
        dataset = StreamDataset(self.index.stream, split, ImageDataset([], transform).load, skip_bad=skip_bad)
        return dataset, dataset.workers(workers), 0, []

    def loaders(self, train_set, val_set, batch_size, workers, rank, world_size, seed):
        """The streams deal themselves to ranks and loader workers; the training stream sets each epoch's order."""
        loader = DataLoader(train_set, batch_size=batch_size, num_workers=train_set.workers(workers),
                            generator=torch.Generator())  # fmt: skip
        val_loader = None
        if val_set is not None:
            val_loader = DataLoader(val_set, batch_size=batch_size * 2, num_workers=val_set.workers(workers))
        return train_set, loader, val_loader


def data_source(index: DatasetIndex) -> ListedSource:
    """The source of ``index``: streamed where it was opened from ``wds:`` shards, else listed."""
    return StreamedSource(index) if index.stream is not None else ListedSource(index)
