"""Streamed shards (``--data wds:SPEC``): finegrain's shards read in order, from any place WebDataset can open.

``SPEC`` is a WebDataset URL list: brace patterns (``/data/cub/train-{000000..000009}.tar``), several lists joined
by ``::``, and ``pipe:`` commands (``pipe:aws s3 cp s3://bucket/cub/train-{000000..000009}.tar -``), so shards can
come from object storage through the user's own tools. A shard's split is in its name (``train-000000.tar``, as
``finegrain data shard`` writes them); the class list, part names and split sizes are in the ``__finegrain__.json``
member every shard begins with, read from the first shard.

Under DDP the training shards are dealt to ranks (shard i to rank i mod world size) and, within a rank, to loader
workers; each rank cycles through its own shards, in an order shuffled per epoch from the run's seed, until it has
given the same number of batches as every other rank. So ranks see disjoint images, take equal steps (no hang on
uneven shards), and epoch e is the same stream whether the run got there straight or through ``--resume``.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from finegrain.data.records import SPLITS, Sample
from finegrain.data.shards import META_KEY, image_extension, sample_from_meta
from finegrain.errors import BadImageError, DataError
from finegrain.extras import need

PREFIX = "wds:"
SHARD_NAME = re.compile(r"(train|val|test)-\d+\.tar")
SHUFFLE_BUFFER = 256  # images shuffled across within a rank's stream (shards are shuffled too)


def is_stream(data: str | Path) -> bool:
    return str(data).startswith(PREFIX)


def _records(url: str) -> Iterator[dict]:
    """The samples of one shard as WebDataset dicts (``__key__``, ``__url__``, one entry per member)."""
    import webdataset as wds

    try:
        yield from wds.tarfile_samples([{"url": url}])
    except Exception as e:  # noqa: BLE001 - gopen, tarfile and subprocess errors all mean the same to the user
        reason = f"{type(e).__name__}: {str(e.args[0]) if e.args else e}"
        raise DataError(f"shard '{url}' cannot be read ({reason}); it may be truncated or the command may have "
                        "failed: check it, or write the shards again with `finegrain data shard`") from e  # fmt: skip


@dataclass
class ShardStream:
    """What a ``wds:`` spec names: the shard URLs per split and the dataset's header."""

    spec: str
    urls: dict[str, list[str]]
    header: dict

    @property
    def classes(self) -> list[str]:
        return self.header["classes"]

    def count(self, split: str) -> int:
        return int(self.header["splits"].get(split, 0))


def open_stream(spec: str) -> ShardStream:
    need("shards", "streamed shards (wds:)")
    from webdataset.shardlists import expand_urls

    urls = expand_urls(spec[len(PREFIX) :])
    if not urls or not urls[0]:
        raise DataError(f"'{spec}' names no shard: write wds: then a WebDataset URL list, e.g. "
                        "wds:/data/cub/train-{000000..000009}.tar::/data/cub/test-{000000..000002}.tar")  # fmt: skip
    by_split: dict[str, list[str]] = {sp: [] for sp in SPLITS}
    for url in urls:
        name = re.search(r"[^/\s]+\.tar", url)
        match = SHARD_NAME.fullmatch(name.group(0)) if name else None
        if match is None:
            raise DataError(f"'{url}' in '{spec}' is not named SPLIT-NNNNNN.tar (SPLIT: train, val or test), as "
                            "`finegrain data shard` names shards: the split of its images is unknown")  # fmt: skip
        by_split[match.group(1)].append(url)
    first = next(_records(urls[0]), None)
    if first is None:
        raise DataError(f"'{urls[0]}' (the first shard of '{spec}') holds nothing: the spec matches no shard, or "
                        "the command printed nothing. Check the path or command")  # fmt: skip
    if first["__key__"] != META_KEY or "json" not in first:
        raise DataError(f"'{urls[0]}' does not begin with {META_KEY}.json, so the class list is missing: write the "
                        "shards with `finegrain data shard`")  # fmt: skip
    header = json.loads(first["json"])
    if not header.get("classes"):
        raise DataError(f"'{urls[0]}': {META_KEY}.json has no class list: write the shards with `finegrain data shard`")
    return ShardStream(spec, {sp: v for sp, v in by_split.items() if v}, header)


def record_sample(record: dict, split: str, class_index: dict[str, int]) -> Sample:
    """A streamed record as a :class:`Sample` whose bytes are in memory."""
    url, key = record["__url__"], record["__key__"]
    ext = image_extension(url, key, list(record))
    data = record[ext]
    return sample_from_meta(url, key, record["json"], split, class_index, (f"{key}.{ext}", 0, len(data)), data)


def iter_samples(stream: ShardStream, split: str, urls: list[str] | None = None) -> Iterator[Sample]:
    """Every sample of ``split`` (or of ``urls``), shard by shard, in order."""
    class_index = {c: i for i, c in enumerate(stream.classes)}
    for url in stream.urls.get(split, []) if urls is None else urls:
        for record in _records(url):
            if record["__key__"] != META_KEY:
                yield record_sample(record, split, class_index)


class StreamDataset(IterableDataset):
    """Images of one split, streamed, through ``load`` (an ``ImageDataset``'s ``load``: transform and targets).

    ``steps`` (training): each rank yields exactly ``steps * batch_size`` items per epoch from its own shards,
    cycling through them; None (evaluation): each rank's shards once. Unreadable images raise, naming the shard
    and member, or with ``skip_bad`` are skipped, each named in a warning."""

    def __init__(self, stream: ShardStream, split: str, load: Callable[[Sample], tuple], rank: int = 0,
                 world_size: int = 1, seed: int = 0, steps: int | None = None, batch_size: int = 1,
                 skip_bad: bool = False) -> None:  # fmt: skip
        urls = stream.urls.get(split, [])
        if steps is not None and len(urls) < world_size:
            raise DataError(f"{len(urls)} {split} shard(s) for {world_size} processes: every process needs its own "
                            f"shards. Write smaller shards (`finegrain data shard --shard-size`)")  # fmt: skip
        self.stream, self.split, self.load = stream, split, load
        self.urls = urls[rank::world_size]
        self.rank, self.seed, self.steps, self.batch_size, self.skip_bad = rank, seed, steps, batch_size, skip_bad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def workers(self, wanted: int) -> int:
        """Loader workers this rank can use: each needs at least one shard."""
        return max(0, min(wanted, len(self.urls)))

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an evaluation stream has no length before it is read")
        return self.steps * self.batch_size

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = self.urls[worker::workers]
        if self.steps is None:
            yield from self._items(urls, None)
            return
        batches = self.steps // workers + (worker < self.steps % workers)  # the loader takes whole batches in turn
        yield from self._items(urls, batches * self.batch_size)

    def _items(self, urls: list[str], count: int | None) -> Iterator[tuple]:
        """``count`` items (None: one pass), pass after pass over ``urls``; within a pass the shard order and the
        images (through a buffer of ``SHUFFLE_BUFFER``) are shuffled, and the buffer is emptied at the end of each
        pass, so every image comes once per pass."""
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}")
        given = 0
        while True:
            order = list(urls)
            if count is not None:
                rng.shuffle(order)
            buffer: list[tuple] = []
            for sample in iter_samples(self.stream, self.split, order):
                item = self._load(sample)
                if item is None:
                    continue
                if count is None:
                    yield item
                    continue
                buffer.append(item)
                if len(buffer) < SHUFFLE_BUFFER:
                    continue
                yield buffer.pop(rng.randrange(len(buffer)))
                given += 1
                if given == count:
                    return
            if count is None:
                return
            if not buffer and given == 0:
                raise DataError(f"no readable image in the {self.split} shards {', '.join(urls)}")
            rng.shuffle(buffer)
            for item in buffer:
                yield item
                given += 1
                if given == count:
                    return

    def _load(self, sample: Sample) -> tuple | None:
        try:
            return self.load(sample)
        except BadImageError as e:
            if not self.skip_bad:
                raise
            warnings.warn(f"--skip-bad: skipped {sample.key} ({e.reason})", stacklevel=2)
            return None
