import csv

import pytest

from finegrain.data import load_dataset, save_split
from finegrain.data.datasets import detect_format
from finegrain.errors import DataError

from .conftest import make_cub, make_imagefolder, write_images


def test_cub_layout_reads_labels_split_boxes_and_parts(cub):
    index = load_dataset(cub, val_fraction=0.0)
    assert index.format == "cub" and detect_format(cub) == "cub"
    assert index.classes == [f"{c + 1:03d}.Species_{c}" for c in range(4)]
    assert len(index.split("train")) == 20 and len(index.split("test")) == 20
    s = index.samples[0]
    assert s.label == 0 and s.image_id == "1" and s.path.is_file()
    assert s.bbox == (4.0, 5.0, 40.0, 30.0)
    assert index.part_names == ["beak", "tail"]
    assert s.parts == ((10.0, 12.0, True), (0.0, 0.0, False))  # invisible part kept, flagged


def test_cub_val_is_carved_from_train_only(cub):
    index = load_dataset(cub, val_fraction=0.2)
    assert len(index.split("test")) == 20  # the official test split is untouched
    assert len(index.split("val")) == 4 and len(index.split("train")) == 16
    assert {s.label for s in index.split("val")} == {0, 1, 2, 3}  # stratified: one per class


def test_imagefolder_split_is_stratified_deterministic_and_restorable(imagefolder, tmp_path):
    a = load_dataset(imagefolder, val_fraction=0.2, test_fraction=0.3, seed=3)
    b = load_dataset(imagefolder, val_fraction=0.2, test_fraction=0.3, seed=3)
    assert a.format == "imagefolder"
    assert [s.split for s in a.samples] == [s.split for s in b.samples]
    for label in range(4):
        splits = [s.split for s in a.samples if s.label == label]
        assert splits.count("test") == 3 and splits.count("val") == 1 and splits.count("train") == 6
    other = load_dataset(imagefolder, val_fraction=0.2, test_fraction=0.3, seed=4)
    assert [s.split for s in other.samples] != [s.split for s in a.samples]
    save_split(a, tmp_path / "split.csv")
    restored = load_dataset(imagefolder, val_fraction=0.5, test_fraction=0.5, seed=9, split_file=tmp_path / "split.csv")
    assert [s.split for s in restored.samples] == [s.split for s in a.samples]


def test_manifest_with_and_without_split(tmp_path):
    folder = make_imagefolder(tmp_path / "imgs", num_classes=2, per_class=4)
    rows = [("path", "label", "split")]
    for p in sorted(folder.rglob("*.jpg")):
        rows.append((p.relative_to(tmp_path).as_posix(), p.parent.name, "test" if p.stem.endswith("3") else "train"))
    with (tmp_path / "data.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    index = load_dataset(tmp_path / "data.csv", val_fraction=0.0)
    assert index.format == "manifest" and index.classes == ["class_0", "class_1"]
    assert len(index.split("test")) == 2 and len(index.split("train")) == 6

    (tmp_path / "nosplit.csv").write_text("\n".join(f"{r[0]},{r[1]}" for r in rows[1:]))
    index = load_dataset(tmp_path / "nosplit.csv", val_fraction=0.0, test_fraction=0.25)
    assert len(index.split("test")) == 2


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: (r / "images.txt").write_text((r / "images.txt").read_text() + "99 001.Species_0/nope.jpg\n"),
         "no label for image id 99"),
        (lambda r: (r / "image_class_labels.txt").write_text("1 7\n" + (r / "image_class_labels.txt").read_text()[4:]),
         "class id 7"),
        (lambda r: next((r / "images").rglob("img_001.jpg")).unlink(), "do not exist"),
        (lambda r: (r / "train_test_split.txt").write_text("1 1\n"), "has no train/test entry"),
        (lambda r: (r / "classes.txt").unlink(), "missing file"),
    ],
)  # fmt: skip
def test_cub_errors_name_the_problem(tmp_path, breakage, message):
    root = make_cub(tmp_path / "cub", num_classes=2, per_class=4)
    breakage(root)
    with pytest.raises(DataError, match=message):
        load_dataset(root)


def test_empty_class_folder_and_unknown_layout(tmp_path):
    root = make_imagefolder(tmp_path / "f", num_classes=2, per_class=2)
    (root / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class.*is empty"):
        load_dataset(root)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="cannot tell the layout"):
        load_dataset(tmp_path / "flat")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")


def test_manifest_errors(tmp_path):
    import numpy as np

    write_images(tmp_path / "a", 0, 1, np.random.default_rng(0))
    (tmp_path / "bad_split.csv").write_text("a/img_000.jpg,cat,holdout\n")
    with pytest.raises(DataError, match="bad_split.csv:1: split must be one of"):
        load_dataset(tmp_path / "bad_split.csv")
    (tmp_path / "missing.csv").write_text("a/img_000.jpg,cat\na/gone.jpg,cat\n")
    with pytest.raises(DataError, match="gone.jpg"):
        load_dataset(tmp_path / "missing.csv", test_fraction=0)
