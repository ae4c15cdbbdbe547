"""Unlabelled images (``--unlabeled``, ``finegrain data suggest``): a folder of images, or a CSV whose rows name an
image and leave the label empty, checked against the labelled dataset.

Nothing is dropped silently: an image whose bytes equal a labelled image (of any split: an unlabelled copy of a test
photo would leak it into training) or an earlier unlabelled one is dropped and reported; an unreadable image stops
the run, or with ``--skip-bad`` is dropped and reported.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

from finegrain.data.datasets import read_text
from finegrain.data.loading import find_bad_images, list_images
from finegrain.data.records import DatasetIndex, Sample
from finegrain.errors import DataError
from finegrain.progress import progress_bar
from finegrain.run_layout import RunDir

#: the split name unlabelled samples carry (their label is -1)
UNLABELED = "unlabeled"


@dataclass
class UnlabeledImages:
    samples: list[Sample]  # the images kept, label -1
    duplicates: list[tuple[Path, str]] = field(default_factory=list)  # (dropped file, what it repeats)
    bad: list[tuple[Path, str]] = field(default_factory=list)  # (dropped unreadable file, why), with skip_bad

    def report(self) -> dict:
        return {"kept": len(self.samples), "duplicates_dropped": [[str(p), why] for p, why in self.duplicates],
                "unreadable_dropped": [[str(p), why] for p, why in self.bad]}  # fmt: skip

    def summary(self) -> str:
        parts = [f"{len(self.samples)} unlabelled image(s)"]
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} duplicate(s) of labelled or earlier images dropped")
        if self.bad:
            parts.append(f"{len(self.bad)} unreadable dropped (--skip-bad)")
        return ", ".join(parts)


def read_unlabeled_paths(path: str | Path) -> list[Path]:
    """The image files of a folder (recursively), or the paths of a CSV (``path[,label]``, label empty; relative to
    the CSV; a header row is optional)."""
    path = Path(path).expanduser()
    if not path.is_file():
        if path.is_dir() and not any(path.iterdir()):
            raise DataError(f"the unlabelled folder '{path}' is empty: put images in it or leave --unlabeled out")
        return list_images(path)
    rows = [(i, r) for i, r in enumerate(csv.reader(io.StringIO(read_text(path), newline="")), 1) if r and r[0].strip()]
    if rows and rows[0][1][0].strip().lower() == "path":
        rows = rows[1:]
    if not rows:
        raise DataError(f"the unlabelled manifest '{path}' has no rows (expected: one image path per row)")
    labelled = [i for i, r in rows if len(r) > 1 and r[1].strip()]
    if labelled:
        raise DataError(f"{path}:{labelled[0]}: this row has a label, but --unlabeled takes images without one "
                        f"({len(labelled)} labelled row(s)): move labelled rows to the training data")  # fmt: skip
    return [path.parent / r[0].strip() for _, r in rows]


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def load_unlabeled(path: str | Path, index: DatasetIndex, skip_bad: bool = False,
                   progress: bool = True) -> UnlabeledImages:  # fmt: skip
    """The unlabelled images of ``path`` that are readable and repeat no labelled or earlier unlabelled image."""
    files = read_unlabeled_paths(path)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{len(missing)} unlabelled image(s) do not exist, e.g. '{missing[0]}': fix the list")
    seen = {digest(s.read_bytes()): f"{index.relpath(s)} ({s.split})" for s in index.samples}
    kept, duplicates = [], []
    for f in progress_bar(files, desc="unlabelled images", disable=not progress, leave=False):
        d = digest(f.read_bytes())
        if d in seen:
            duplicates.append((f, f"the same bytes as {seen[d]}"))
            continue
        seen[d] = f"{f} (unlabelled)"
        kept.append(Sample(f, -1, UNLABELED))
    bad = find_bad_images(kept, progress=progress)
    if bad and not skip_bad:
        listed = "; ".join(f"{s.path}: {why}" for s, why in bad[:3])
        raise DataError(f"{len(bad)} unlabelled image(s) cannot be read ({listed}). Remove them, or add --skip-bad "
                        f"to drop them (they are listed in RUN_DIR/{RunDir.UNLABELED})")  # fmt: skip
    dropped = {s.path for s, _ in bad}
    kept = [s for s in kept if s.path not in dropped]
    if not kept:
        example = f" (e.g. '{duplicates[0][0]}': {duplicates[0][1]})" if duplicates else ""
        raise DataError(f"no usable unlabelled image in '{path}': of {len(files)}, {len(duplicates)} repeat labelled "
                        f"or earlier images{example} and {len(bad)} cannot be read")  # fmt: skip
    return UnlabeledImages(kept, duplicates, [(s.path, why) for s, why in bad])
