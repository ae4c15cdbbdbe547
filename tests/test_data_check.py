import json
import shutil

import pytest

from finegrain.cli import main
from finegrain.data import load_dataset
from finegrain.data.check import check_dataset
from finegrain.engine.train import fit

from .conftest import make_cub, make_imagefolder, require_data


def break_files(root):
    """One truncated JPEG, one text file posing as an image, one non-image file; returns their paths."""
    imgs = sorted(root.rglob("*.jpg"))
    truncated = imgs[0]
    truncated.write_bytes(truncated.read_bytes()[:300])
    fake = imgs[1]
    fake.write_text("not an image")
    notes = imgs[2].parent / "notes.txt"
    notes.write_text("hello")
    return truncated, fake, notes


def test_check_lists_every_bad_file(imagefolder, capsys):
    bad = break_files(imagefolder)
    report = check_dataset(load_dataset(imagefolder), progress=False)
    assert not report.ok
    assert sorted(p for p, _ in report.bad) == sorted(str(p) for p in bad)
    assert main(["data", "check", str(imagefolder)]) == 1
    out = capsys.readouterr().out
    for p in bad:
        assert f"BAD IMAGE {p}" in out


def test_check_reports_counts_sizes_and_passes_clean_data(cub, capsys):
    assert main(["data", "check", str(cub), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["num_classes"] == 4
    assert report["images"] == {"train": 20, "test": 20}
    assert report["image_size"]["width"] == {"min": 64, "median": 64.0, "max": 64}
    assert report["per_class"]["001.Species_0"] == {"train": 5, "test": 5}


def test_check_finds_duplicates_and_train_test_leaks(tmp_path, capsys):
    root = make_cub(tmp_path / "cub", num_classes=2, per_class=4)
    imgs = sorted((root / "images" / "001.Species_0").glob("*.jpg"))
    shutil.copy(imgs[0], imgs[1])  # both train: a duplicate
    shutil.copy(imgs[0], imgs[3])  # the copy is in test: a leak
    report = check_dataset(load_dataset(root, val_fraction=0), progress=False)
    assert len(report.duplicates) == 1 and len(report.duplicates[0]) == 3
    assert len(report.leaks) == 1
    assert main(["data", "check", str(root)]) == 1
    assert "LEAK across train/test" in capsys.readouterr().out


def test_training_on_a_broken_file_stops_and_names_it(tmp_path, tiny_config, capsys):
    root = make_imagefolder(tmp_path / "f", num_classes=2, per_class=6)
    truncated, *_ = break_files(root)
    args = ["train", "--data", str(root), "--input-size", "64", "--epochs", "1", "--workers", "0",
            "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--test-fraction", "0",
            "--val-fraction", "0"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "finegrain data check" in err and "Traceback" not in err
    assert any(str(p) in err for p in sorted(root.rglob("*")) if p.is_file())


def test_skip_bad_skips_and_reports(tmp_path, tiny_config):
    root = make_imagefolder(tmp_path / "f", num_classes=2, per_class=6)
    bad = break_files(root)
    result = fit(tiny_config(root, epochs=1, skip_bad=True, test_fraction=0, val_fraction=0))
    skipped = (result.run_dir / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in skipped) == sorted(str(p) for p in bad)


@pytest.mark.parametrize("workers", [0, 2])
def test_broken_file_in_image_training_is_named(tmp_path, tiny_config, workers):
    from finegrain.errors import BadImageError

    root = make_imagefolder(tmp_path / "f", num_classes=2, per_class=6)
    truncated = sorted(root.rglob("*.jpg"))[0]  # the only bad file: the error must name this one
    truncated.write_bytes(truncated.read_bytes()[:300])
    cfg = tiny_config(root, epochs=1, freeze_backbone=False, workers=workers, test_fraction=0, val_fraction=0)
    with pytest.raises(BadImageError, match="cannot read image") as err:
        fit(cfg)
    assert str(truncated) in str(err.value)


@pytest.mark.slow
def test_real_imagefolder_flowers17_is_clean(capsys):
    from .conftest import CUB100

    flowers = CUB100.parent / "flowers17"
    require_data(flowers)
    assert main(["data", "check", str(flowers), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_classes"] == 17 and sum(report["images"].values()) == 17 * 80
    assert report["images"]["test"] == 17 * 16  # 20% of each class, stratified
