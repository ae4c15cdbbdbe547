"""``finegrain data check``: everything wrong with a dataset, listed by path, in one pass."""

from __future__ import annotations

import hashlib
import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from finegrain.data.loading import open_sample
from finegrain.data.records import DatasetIndex, Sample
from finegrain.data.stream import iter_samples
from finegrain.errors import BadImageError
from finegrain.progress import progress_bar


@dataclass
class CheckReport:
    classes: list[str]
    counts: dict[str, list[int]]  # split -> images per class
    sizes: dict[str, dict[str, float]]  # width/height -> min/median/max
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates: list[list[str]] = field(default_factory=list)  # groups of byte-identical files
    leaks: list[list[str]] = field(default_factory=list)  # duplicate groups that span train/val and test
    notes: list[str] = field(default_factory=list)
    class_info: dict | None = None  # ClassInfo.coverage when the dataset has class side-information
    #: files a manifest names outside its own folder: allowed (a manifest lists them on purpose), but listed
    outside: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Bad files and train/test leaks are errors; duplicates inside one split are only listed."""
        return not self.bad and not self.leaks

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "num_classes": len(self.classes),
            "images": {sp: int(sum(c)) for sp, c in self.counts.items()},
            "per_class": {name: {sp: c[i] for sp, c in self.counts.items()} for i, name in enumerate(self.classes)},
            "image_size": self.sizes,
            "bad_files": [{"path": p, "reason": r} for p, r in self.bad],
            "duplicates": self.duplicates,
            "train_test_leaks": self.leaks,
            "notes": self.notes,
            "class_info": self.class_info,
            "outside_the_dataset_folder": self.outside,
        }


def check_dataset(index: DatasetIndex, progress: bool = True) -> CheckReport:
    """Decode every image (truncation included), hash every file, and count per class and split."""
    if index.stream is None:
        splits = sorted({s.split for s in index.samples}, key=["train", "val", "test"].index)
        samples: Iterable[Sample] = index.samples
    else:  # streamed shards: one pass in order
        splits = list(index.stream.urls)
        samples = itertools.chain.from_iterable(iter_samples(index.stream, sp) for sp in splits)
    counts = {sp: [0] * len(index.classes) for sp in splits}
    widths, heights, bad = [], [], []
    by_hash: dict[str, list[tuple[str, str]]] = defaultdict(list)  # (key, split): never the bytes of a stream
    total = sum(index.count(sp) for sp in splits)
    for s in progress_bar(samples, desc="checking", disable=not progress, unit="img", total=total):
        counts[s.split][s.label] += 1
        data = s.read_bytes()
        by_hash[hashlib.sha1(data).hexdigest()].append((s.key, s.split))
        try:
            w, h = open_sample(s).size
            widths.append(w)
            heights.append(h)
        except BadImageError as e:
            bad.append((s.key, str(e.__cause__)))
    groups = [g for g in by_hash.values() if len(g) > 1]
    leaks = [g for g in groups if {sp for _, sp in g} & {"test"} and {sp for _, sp in g} - {"test"}]

    def stats(v: list[int]) -> dict[str, float]:
        return {"min": int(min(v)), "median": float(np.median(v)), "max": int(max(v))} if v else {}

    notes = list(index.notes)
    outside = []
    if index.format == "manifest":
        home = (index.root if index.root.is_dir() else index.root.parent).resolve()
        outside = [str(s.path) for s in index.samples if not s.path.resolve().is_relative_to(home)]
        if outside:
            notes.append(f"{len(outside)} file(s) named by the manifest are outside its folder '{home}' (listed)")
    for sp, c in counts.items():
        empty = [index.classes[i] for i, n in enumerate(c) if n == 0]
        if empty and sp != "val":
            notes.append(f"{len(empty)} class(es) have no {sp} images: {', '.join(empty[:5])}")
    return CheckReport(
        classes=index.classes,
        counts=counts,
        sizes={"width": stats(widths), "height": stats(heights)},
        bad=bad,
        duplicates=[[key for key, _ in g] for g in groups],
        leaks=[[f"{sp}:{key}" for key, sp in g] for g in leaks],
        notes=notes,
        outside=outside,
    )
