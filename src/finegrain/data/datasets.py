"""Dataset indexes for the layouts finegrain reads: CUB-200-2011, ImageFolder, CSV manifests, and WebDataset
shards (``finegrain.data.shards``).

An index is a plain list of :class:`Sample` records (where its bytes are, label, split, optional box and parts),
each named by its ``key``: a file's path, or a shard's path and member; images are only opened by the loader.
Every structural problem raises :class:`DataError` naming the file/line.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from finegrain.atomic import atomic_path
from finegrain.data.records import FORMATS, SPLITS, DatasetIndex, Sample
from finegrain.data.shards import INFO, read_shards
from finegrain.data.stream import is_stream, open_stream
from finegrain.errors import DataError

IGNORED_FILES = {"Thumbs.db", "desktop.ini"}
INFO_DIR = "class_info"  # class side-information beside the images (finegrain.data.class_info), not a class
MANIFEST_NAME = "manifest.csv"  # the CSV a folder's manifest is read from when the folder holds others too


def missing_dataset(path: Path) -> DataError:
    return DataError(f"dataset path '{path}' does not exist: pass --data PATH (a dataset folder, a CSV manifest or "
                     "shards; `finegrain data check PATH` shows what it finds)")  # fmt: skip


def detect_format(path: Path) -> str:
    if path.is_file():
        return "manifest"
    if not path.is_dir():
        raise missing_dataset(path)
    if (path / INFO).is_file():
        return "shards"
    if (path / "images.txt").is_file() and (path / "image_class_labels.txt").is_file():
        return "cub"
    if (path / MANIFEST_NAME).is_file():  # before ImageFolder: a manifest's images usually sit in sub-folders
        return "manifest"
    if any(p.is_dir() and not p.name.startswith(".") and p.name != INFO_DIR for p in path.iterdir()):
        return "imagefolder"
    csvs = sorted(path.glob("*.csv"))
    if len(csvs) == 1:
        return "manifest"
    raise DataError(
        f"cannot tell the layout of '{path}': expected CUB files (images.txt, image_class_labels.txt), "
        f"one sub-folder per class (ImageFolder), a CSV manifest, or shards ({INFO}). Force one with --format."
    )


def read_text(path: Path) -> str:
    """A dataset's text file as UTF-8 (a byte-order mark is allowed); other encodings are named, not guessed."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: byte 0x{data[e.start]:02x} is not UTF-8 text. Save the file as UTF-8 (e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > fixed && mv fixed {path.name}`) and run the command again."
        ) from e


def _read_table(path: Path, min_cols: int) -> list[list[str]]:
    if not path.is_file():
        raise DataError(f"missing file '{path}' (required by the CUB-200-2011 layout)")
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split()
        if len(cols) < min_cols:
            raise DataError(f"{path}:{lineno}: expected at least {min_cols} columns, got '{line}'")
        rows.append(cols)
    return rows


def read_cub(root: Path) -> DatasetIndex:
    """Official CUB-200-2011 layout; boxes and part keypoints are attached when their files exist."""
    classes_rows = _read_table(root / "classes.txt", 2)
    class_ids = [r[0] for r in classes_rows]
    classes = [" ".join(r[1:]) for r in classes_rows]
    class_index = {cid: i for i, cid in enumerate(class_ids)}
    images = {r[0]: " ".join(r[1:]) for r in _read_table(root / "images.txt", 2)}
    labels = {r[0]: r[1] for r in _read_table(root / "image_class_labels.txt", 2)}
    split_file = root / "train_test_split.txt"
    splits = {r[0]: r[1] for r in _read_table(split_file, 2)} if split_file.is_file() else {}

    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", splits)):
        unknown = sorted(set(table) - set(images), key=str)
        if table and unknown:
            raise DataError(f"{root / name}: image id(s) {unknown[:5]} are not in images.txt")
    bboxes = {}
    if (root / "bounding_boxes.txt").is_file():
        bboxes = {r[0]: tuple(float(v) for v in r[1:5]) for r in _read_table(root / "bounding_boxes.txt", 5)}
    part_names, parts = _read_cub_parts(root, images)

    samples = []
    for image_id, rel in images.items():
        if image_id not in labels:
            raise DataError(f"{root / 'image_class_labels.txt'}: no label for image id {image_id} ({rel})")
        cid = labels[image_id]
        if cid not in class_index:
            raise DataError(
                f"{root / 'image_class_labels.txt'}: image id {image_id} has class id {cid}, "
                "which is not in classes.txt"
            )
        if splits and image_id not in splits:
            raise DataError(f"{split_file}: image id {image_id} ({rel}) has no train/test entry")
        split = "train" if not splits or splits[image_id] == "1" else "test"
        samples.append(
            Sample(
                path=root / "images" / rel,
                label=class_index[cid],
                split=split,
                image_id=image_id,
                bbox=bboxes.get(image_id),
                parts=parts.get(image_id),
            )
        )
    notes = [] if splits else ["no train_test_split.txt: a test split is carved from the data"]
    return DatasetIndex(root, "cub", classes, samples, part_names, notes)


def _read_cub_parts(root: Path, images: dict[str, str]):
    locs_file, names_file = root / "parts" / "part_locs.txt", root / "parts" / "parts.txt"
    if not locs_file.is_file():
        return None, {}
    names = [" ".join(r[1:]) for r in _read_table(names_file, 2)]
    per_image: dict[str, list[tuple[float, float, bool]]] = {}
    for image_id, part_id, x, y, visible in (r[:5] for r in _read_table(locs_file, 5)):
        if image_id not in images:
            raise DataError(f"{locs_file}: image id {image_id} is not in images.txt")
        slots = per_image.setdefault(image_id, [(0.0, 0.0, False)] * len(names))
        index = int(part_id) - 1
        if not 0 <= index < len(names):
            raise DataError(f"{locs_file}: part id {part_id} is not in parts/parts.txt")
        slots[index] = (float(x), float(y), visible == "1")
    return names, {k: tuple(v) for k, v in per_image.items()}


def read_imagefolder(root: Path) -> DatasetIndex:
    """One sub-folder per class; every non-hidden file inside counts (bad files are reported, not skipped)."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != INFO_DIR)
    if not class_dirs:
        raise DataError(f"'{root}' has no class sub-folders (ImageFolder layout: ROOT/<class>/<image>)")
    samples = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.name not in IGNORED_FILES
        )
        if not files:
            raise DataError(f"class folder '{class_dir}' is empty: add images or remove the folder")
        samples += [Sample(path=p, label=label, split="train") for p in files]
    notes = ["ImageFolder has no official split: a stratified, seeded one is made and saved"]
    return DatasetIndex(root, "imagefolder", [d.name for d in class_dirs], samples, notes=notes)


def read_manifest(path: Path) -> DatasetIndex:
    """CSV with columns ``path,label[,split]``; paths are relative to the CSV file; a header row is optional.

    A folder is read through its ``manifest.csv``, or through its only CSV file."""
    if path.is_dir():
        csvs = [path / MANIFEST_NAME] if (path / MANIFEST_NAME).is_file() else sorted(path.glob("*.csv"))
        if len(csvs) != 1:
            raise DataError(f"'{path}' must hold exactly one .csv manifest (found {len(csvs)}); pass the file")
        path = csvs[0]
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    rows = [(i, r) for i, r in enumerate(reader, 1) if r and any(c.strip() for c in r)]
    if rows and rows[0][1][0].strip().lower() == "path":
        rows = rows[1:]
    if not rows:
        raise DataError(f"manifest '{path}' has no rows (expected: path,label[,split])")
    entries = []
    for lineno, row in rows:
        if len(row) < 2:
            raise DataError(f"{path}:{lineno}: expected 'path,label[,split]', got {','.join(row)!r}")
        split = row[2].strip().lower() if len(row) > 2 and row[2].strip() else ""
        if split and split not in SPLITS:
            raise DataError(f"{path}:{lineno}: split must be one of {', '.join(SPLITS)}, got '{row[2]}'")
        entries.append((path.parent / row[0].strip(), row[1].strip(), split, lineno))
    classes = sorted({e[1] for e in entries})
    class_index = {c: i for i, c in enumerate(classes)}
    has_split = any(e[2] for e in entries)
    if has_split and not all(e[2] for e in entries):
        missing = next(e for e in entries if not e[2])
        raise DataError(f"{path}:{missing[3]}: some rows have a split and this one has none; give all or none")
    entries, repeated = _without_repeats(path, entries)
    samples = [Sample(p, class_index[lab], split or "train") for p, lab, split, _ in entries]
    notes = [] if has_split else ["the manifest has no split column: a stratified, seeded split is made"]
    if repeated:
        notes.append(f"{repeated} repeated row(s) (same file, label and split) counted once")
    return DatasetIndex(path, "manifest", classes, samples, notes=notes)


def _without_repeats(path: Path, entries: list) -> tuple[list, int]:
    """One entry per file. A file listed twice with the same label and split is counted once (and reported);
    with two labels, or in two splits (a train/test leak), it is an error naming both lines."""
    first: dict[Path, tuple] = {}
    kept = []
    for entry in entries:
        key = entry[0].resolve()
        if key not in first:
            first[key] = entry
            kept.append(entry)
            continue
        other = first[key]
        if other[1] != entry[1]:
            raise DataError(
                f"{path}:{other[3]} and line {entry[3]} label the same file '{entry[0]}' as '{other[1]}' and "
                f"'{entry[1]}': keep the right label and remove the other row."
            )
        if other[2] != entry[2]:
            raise DataError(
                f"{path}:{other[3]} and line {entry[3]} put the same file '{entry[0]}' in the {other[2] or 'train'} "
                f"and {entry[2] or 'train'} splits: an image in both would be tested on what it trained on. "
                "Keep one row."
            )
    return kept, len(entries) - len(kept)


READERS = {"cub": read_cub, "imagefolder": read_imagefolder, "manifest": read_manifest}


def stratified_split(
    samples: list[Sample], fraction: float, new_split: str, from_split: str, seed: int
) -> list[Sample]:
    """Move ``fraction`` of each class of ``from_split`` into ``new_split``; deterministic for a seed."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"split fraction must be in [0, 1), got {fraction}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        if s.split == from_split:
            by_class[s.label].append(i)
    rng = np.random.default_rng(seed)
    moved: set[int] = set()
    for label in sorted(by_class):
        idx = sorted(by_class[label], key=lambda i: samples[i].key)
        n = int(round(fraction * len(idx)))
        n = min(n, len(idx) - 1)  # always keep one image of each class where it was
        moved.update(idx[j] for j in rng.permutation(len(idx))[:n])
    return [replace(s, split=new_split) if i in moved else s for i, s in enumerate(samples)]


def load_dataset(
    path: str | Path,
    format: str = "auto",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    split_file: str | Path | None = None,
    check_files: bool = True,
    follow_symlinks: bool = False,
) -> DatasetIndex:
    """Read a dataset, then complete its splits. An ImageFolder class folder that is a link to a place outside the
    dataset is refused unless ``follow_symlinks`` (``data check`` read all of /etc as a class named after a link).

    The official split is kept. Where there is no test split, ``test_fraction`` of each class becomes
    test; ``val_fraction`` of each class's training images becomes validation. ``split_file`` (written by
    :func:`save_split`) restores a saved assignment exactly, so evaluation sees the split training used.
    """
    if is_stream(path):
        stream = open_stream(str(path))
        notes = ["streamed shards: the split is the one made when sharding"]
        return DatasetIndex(Path(str(path)), "wds", stream.classes, [], stream.header.get("part_names"), notes, stream)
    path = Path(path).expanduser()
    if format not in FORMATS:
        raise DataError(f"unknown dataset format '{format}': choose one of {', '.join(FORMATS)}")
    fmt = detect_format(path) if format == "auto" else format
    if not path.exists():
        raise missing_dataset(path)
    index = read_shards(path) if fmt == "shards" else READERS[fmt](path)
    if fmt == "imagefolder" and not follow_symlinks:
        inside = path.resolve()
        for name in index.classes:
            target = (path / name).resolve()
            if not target.is_relative_to(inside):
                raise DataError(f"class folder '{path / name}' is a link to '{target}', outside the dataset '{path}': "
                                "links out of a dataset are not followed unless asked. Pass --follow-symlinks if it "
                                "is meant, or copy the images in")  # fmt: skip
    if split_file is not None and Path(split_file).is_file():
        index.samples = _apply_split_file(index, Path(split_file))
    else:
        if not any(s.split == "test" for s in index.samples) and test_fraction > 0:
            index.samples = stratified_split(index.samples, test_fraction, "test", "train", seed)
        if not any(s.split == "val" for s in index.samples) and val_fraction > 0:
            index.samples = stratified_split(index.samples, val_fraction, "val", "train", seed + 1)
    _check_index(index, check_files)
    return index


def _check_index(index: DatasetIndex, check_files: bool) -> None:
    counts = np.bincount([s.label for s in index.samples], minlength=len(index.classes))
    empty = [index.classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"class(es) with no images: {', '.join(empty[:10])}. Add images or remove the class.")
    if check_files:
        missing = [s.path for s in index.samples if not s.path.is_file()]
        if missing:
            listed = "\n  ".join(str(p) for p in missing[:10])
            more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise DataError(f"{len(missing)} image file(s) listed by the dataset do not exist:\n  {listed}{more}")


def save_split(index: DatasetIndex, path: str | Path) -> None:
    """Write ``relpath,label,split`` rows: the exact assignment a run used."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for s in index.samples:
            writer.writerow([index.relpath(s), index.classes[s.label], s.split])


def _apply_split_file(index: DatasetIndex, split_file: Path) -> list[Sample]:
    with split_file.open(newline="") as f:
        saved = {row["path"]: row["split"] for row in csv.DictReader(f)}
    out = []
    for s in index.samples:
        rel = index.relpath(s)
        if rel not in saved:
            raise DataError(
                f"'{rel}' is in the dataset but not in the saved split '{split_file}': the data changed "
                "since training. Evaluate on the data the model was trained with, or retrain."
            )
        out.append(replace(s, split=saved[rel]))
    return out
