"""The records every reader produces: :class:`Sample` (one image: where its bytes are, its label, split, box and
parts, named by its ``key``) and :class:`DatasetIndex` (the classes and the samples, listed or streamed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from finegrain.errors import DataError

SPLITS = ("train", "val", "test")
#: the layouts a dataset may come in (``--format``; ``auto`` looks at the folder)
FORMATS = ("auto", "cub", "imagefolder", "manifest", "shards")

#: the longest side over the shortest that an image may have, on every path that decodes (train, predict, serve,
#: data check). The area limit alone let thin images through: a 39 KB PNG of 400,000 x 100 resized to 224 on its
#: short side becomes 896,000 x 224 (200 megapixels; a server went from 0.94 to 2.24 GB and took 9 s), and one of
#: 40,000,000 x 1 overflowed the resize (a 500). At 50:1 the resized image is at most 50 x 224 x 224 pixels, and
#: panoramas and banners still pass.
MAX_ASPECT = 50.0


class Stream(Protocol):
    """Images read in order (``finegrain.data.stream.ShardStream``): counted, never listed."""

    urls: dict[str, list[str]]  # the shards of each split

    def count(self, split: str) -> int: ...


@dataclass(frozen=True)
class Sample:
    path: Path  # the image file, or the shard (tar file) that holds it as ``member``
    label: int
    split: str
    image_id: str | None = None
    bbox: tuple[float, float, float, float] | None = None  # x, y, width, height in pixels
    parts: tuple[tuple[float, float, bool], ...] | None = None  # (x, y, visible) per part name
    member: tuple[str, int, int] | None = None  # in a shard: (member name, byte offset, size)
    data: bytes | None = field(default=None, repr=False, compare=False)  # a streamed image's bytes

    @property
    def key(self) -> str:
        """What names this image everywhere (reports, skip lists, caches): its path, or ``shard#member``."""
        return f"{self.path}#{self.member[0]}" if self.member else str(self.path)

    def read_bytes(self) -> bytes:
        """The image file's bytes as stored."""
        if self.data is not None:
            return self.data
        if self.member is None:
            return self.path.read_bytes()
        _, offset, size = self.member
        with self.path.open("rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise DataError(f"shard '{self.path}' ends inside member '{self.member[0]}' (truncated): write the "
                            "shards again with `finegrain data shard`")  # fmt: skip
        return data


@dataclass
class DatasetIndex:
    root: Path
    format: str
    classes: list[str]
    samples: list[Sample]
    part_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    stream: Stream | None = None  # --data wds:SPEC: images are read in order, never listed (samples is empty)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def count(self, name: str) -> int:
        """Images in a split, listed or streamed."""
        return self.stream.count(name) if self.stream is not None else len(self.split(name))

    def relpath(self, sample: Sample) -> str:
        base = self.root if self.root.is_dir() else self.root.parent
        try:
            rel = sample.path.relative_to(base).as_posix()
        except ValueError:
            rel = sample.path.as_posix()
        return f"{rel}#{sample.member[0]}" if sample.member else rel
