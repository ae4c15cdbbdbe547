"""Careless and hostile inputs: each one gets a message that names the problem and the fix (exit 2, no
traceback), or is handled correctly; nothing is silently lost."""

import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from finegrain.checkpoint import Checkpoint
from finegrain.cli import main
from finegrain.data import load_dataset
from finegrain.data.loading import decode_image
from finegrain.engine.evaluate import run_answers
from finegrain.engine.train import fit
from finegrain.errors import CheckpointError, DataError, ImageTooLargeError
from finegrain.export import export_onnx, read_onnx_metadata
from finegrain.export.onnx import METADATA_KEY, save_with_metadata
from finegrain.predict import Predictor
from finegrain.report.card import read_confusion

from .conftest import make_checkpoint, make_imagefolder, synthetic_image


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# --- images -------------------------------------------------------------------------------------------------


def _png(array: np.ndarray, mode: str | None = None) -> io.BytesIO:
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, format="PNG")
    buf.seek(0)
    return buf


def test_16_bit_grayscale_png_keeps_its_picture():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    rgb = np.asarray(decode_image(_png(ramp), "ramp16"))
    assert rgb.shape == (64, 64, 3)
    assert (rgb == 255).mean() < 0.01  # Pillow's convert("RGB") made 99.6% of it white
    expected = (ramp / 257).round()
    assert np.abs(rgb[..., 0] - expected).max() <= 1


def test_transparent_pixels_become_white_not_their_hidden_colour():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red hidden under full transparency
    rgba[:4, :, 3] = 255  # top half opaque red
    rgb = np.asarray(decode_image(_png(rgba, "RGBA"), "alpha"))
    assert (rgb[:4] == [200, 0, 0]).all() and (rgb[4:] == 255).all()


# --- dataset files ------------------------------------------------------------------------------------------


def test_non_utf8_manifest_and_classes_file_are_named(tmp_path, cub, capsys):
    make_imagefolder(tmp_path / "imgs", num_classes=2, per_class=3)
    manifest = tmp_path / "m.csv"
    rows = [f"imgs/class_{c}/img_{i:03d}.jpg,caf\xe9_{c}" for c in range(2) for i in range(3)]
    manifest.write_bytes("\n".join(rows).encode("latin-1"))
    code, err = run_cli(["data", "check", manifest], capsys)
    assert code == 2 and "m.csv:1" in err and "UTF-8" in err
    (cub / "classes.txt").write_bytes((cub / "classes.txt").read_bytes().replace(b"Species_0", b"Esp\xe8ce"))
    code, err = run_cli(["data", "check", cub], capsys)
    assert code == 2 and "classes.txt:1" in err and "UTF-8" in err


def test_same_file_twice_is_counted_once_and_conflicts_are_errors(tmp_path):
    make_imagefolder(tmp_path / "imgs", num_classes=2, per_class=4)
    rows = [f"imgs/class_{c}/img_{i:03d}.jpg,c{c},{'test' if i == 3 else 'train'}" for c in range(2) for i in range(4)]
    (tmp_path / "m.csv").write_text("\n".join([*rows, rows[0]]))
    index = load_dataset(tmp_path / "m.csv", val_fraction=0.0)
    assert len(index.samples) == 8 and any("repeated" in n for n in index.notes)
    (tmp_path / "m.csv").write_text("\n".join([*rows, rows[0].replace(",c0,", ",c1,")]))
    with pytest.raises(DataError, match="label the same file"):
        load_dataset(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("\n".join([*rows, rows[0].replace(",train", ",test")]))
    with pytest.raises(DataError, match="train and test splits"):
        load_dataset(tmp_path / "m.csv")


def test_folder_with_manifest_csv_and_image_subfolders_is_a_manifest(tmp_path):
    make_imagefolder(tmp_path / "images", num_classes=2, per_class=3)
    rows = ["path,label,split", *(f"images/class_{c}/img_{i:03d}.jpg,c{c},train" for c in range(2) for i in range(3))]
    (tmp_path / "manifest.csv").write_text("\n".join(rows))
    (tmp_path / "provenance.csv").write_text("path,source\n")
    index = load_dataset(tmp_path, val_fraction=0.0, test_fraction=0.0)
    assert index.format == "manifest" and index.classes == ["c0", "c1"]


# --- run and cache folders ----------------------------------------------------------------------------------


def test_unwritable_run_dir_is_named_before_training(tmp_path, cub, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    args = ["train", "--data", cub, "--run-dir", blocker / "run", "--input-size", "64", "--workers", "0"]
    code, err = run_cli(args, capsys)
    assert code == 2 and "not writable" in err and "--run-dir" in err


def test_unwritable_cache_is_skipped_with_a_warning(tmp_path, cub, tiny_config):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="feature cache not written"):
        result = fit(tiny_config(cub, epochs=1, cache_dir=str(blocker / "cache")))
    assert (result.run_dir / "best.pt").is_file()


def test_damaged_feature_cache_entry_is_rebuilt_and_reported(tmp_path, cub, tiny_config):
    first = fit(tiny_config(cub, epochs=2, run_dir=str(tmp_path / "a")))
    entries = sorted((tmp_path / "cache" / "features").glob("*.pt"))
    assert entries
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # a writer killed half-way
    with pytest.warns(UserWarning, match="damaged"):
        second = fit(tiny_config(cub, epochs=2, run_dir=str(tmp_path / "b")))
    for a, b in zip(first.model.head.state_dict().values(), second.model.head.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)  # the rebuilt features are the same features
    assert torch.load(entries[0], weights_only=True)["features"].shape[0] > 0


# --- checkpoints --------------------------------------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (print, ("this code ran",))


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "is empty"),
        (b"not a model, just text\n", "text file"),
        (pickle.dumps({"method": _Payload()}), "could run arbitrary code"),
    ],
)
def test_unusable_checkpoints_say_what_they_are_and_never_advise_unsafe_loading(tmp_path, capsys, content, words):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=words) as e:
        Checkpoint.load(run)
    assert "weights_only" not in str(e.value) and "best.pt" in str(e.value)
    code, err = run_cli(["predict", run, run / "best.pt"], capsys)
    assert code == 2 and words in err and "weights_only" not in err
    assert "this code ran" not in capsys.readouterr().out


def test_zero_byte_last_pt_points_to_best_pt(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="best.pt beside it"):
        Checkpoint.load(tmp_path / "last.pt")


# --- ONNX files ---------------------------------------------------------------------------------------------


def _set_metadata_text(path, text: str) -> None:
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            p.value = text
    onnx.save(proto, str(path))


@pytest.mark.parametrize(
    "text, words", [("{not json", "not JSON"), ('{"classes": ["a"]}', "lacks 'preprocess'"), ("[1, 2]", "object")]
)
def test_onnx_metadata_that_is_not_finegrains_is_refused(tmp_path, text, words):
    path = export_onnx(make_checkpoint(tmp_path / "m.pt"), tmp_path / "m.onnx")["path"]
    _set_metadata_text(path, text)
    with pytest.raises(CheckpointError, match=words):
        read_onnx_metadata(path)


def test_onnx_graph_that_disagrees_with_its_metadata_is_refused_everywhere(tmp_path, cub, capsys):
    path = export_onnx(make_checkpoint(tmp_path / "m.pt"), tmp_path / "m.onnx")["path"]  # 3 logits
    meta = read_onnx_metadata(path)
    save_with_metadata(onnx.load(path), {**meta, "classes": [f"c{i}" for i in range(100)]}, tmp_path / "m.onnx")
    with pytest.raises(CheckpointError, match="100 classes"):
        Predictor.load(tmp_path / "m.onnx")
    image = sorted(cub.rglob("*.jpg"))[0]
    code, err = run_cli(["predict", tmp_path / "m.onnx", image], capsys)
    assert code == 2 and "re-export" in err.lower()
    from finegrain.serve.app import create_app

    with pytest.raises(CheckpointError):
        create_app(tmp_path / "m.onnx")


def test_onnx_graph_with_another_input_name_still_predicts(tmp_path, cub):
    path = export_onnx(make_checkpoint(tmp_path / "m.pt"), tmp_path / "m.onnx")["path"]
    proto = onnx.load(path)
    old = proto.graph.input[0].name
    proto.graph.input[0].name = "pixel_values"
    for node in proto.graph.node:
        node.input[:] = ["pixel_values" if i == old else i for i in node.input]
    onnx.save(proto, str(tmp_path / "renamed.onnx"))
    images = sorted(cub.rglob("*.jpg"))[:2]
    a = Predictor.load(tmp_path / "m.onnx").predict_files(images)
    b = Predictor.load(tmp_path / "renamed.onnx").predict_files(images)
    assert a == [{**r, "path": r["path"]} for r in b]


# --- predict on a folder with a bad image -------------------------------------------------------------------


def test_predict_on_a_folder_predicts_the_rest_and_lists_the_bad_ones(tmp_path, cub, capsys):
    ckpt = make_checkpoint(tmp_path / "m.pt")
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted(cub.rglob("*.jpg"))[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = main(["predict", str(ckpt), str(folder), "--json"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert "broken.jpg" in captured.err and "1 of 4" in captured.err
    assert len(json.loads(captured.out)) == 3


@pytest.mark.parametrize(
    "args, words",
    [
        (["--lr", "inf"], "lr: expected a finite number"),
        (["--weight-decay", "nan"], "weight_decay: expected a finite number"),
        (["--clip-grad", "nan"], "clip_grad: expected a finite number"),
        (["--input-size", "-5"], "input_size: -5 is outside 32-1024"),
        (["--input-size", "0"], "input_size: 0 is outside 32-1024"),  # it silently became the backbone's 224
        (["--input-size", "10000"], "input_size: 10000 is outside 32-1024"),
        (["--workers", "-1"], "workers: -1 is outside 0-64"),  # silently accepted before
    ],
)
def test_bad_values_on_the_command_line_are_refused_with_the_key(tmp_path, imagefolder, capsys, args, words):
    code, err = run_cli(["train", "--data", imagefolder, "--run-dir", tmp_path / "run", *args], capsys)
    assert code == 2 and words in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, words",
    [
        (b'epochs: "three"\n', "epochs: expected a whole number, got 'three'"),
        (b"epochs: 1.7\n", "epochs: expected a whole number, got 1.7"),
        (b"epochs: true\n", "epochs: expected a whole number, got True"),  # silently 1 epoch before
        (b"lr: [1, 2]\n", "lr: expected a number, got [1, 2]"),
        (b'input_size: "224"\n', "input_size: expected a whole number or none, got '224'"),
        (b"model_kwargs: pooling=rm\n", "model_kwargs: expected a dict"),
        (b"epochs: [\n", "is not valid YAML"),
        (b"epochs: 3\n# \xff\xfe caf\xe9\n", "is not UTF-8"),
    ],
)
def test_bad_values_in_a_config_file_are_refused_with_the_key(tmp_path, imagefolder, capsys, text, words):
    (tmp_path / "c.yaml").write_bytes(text)
    code, err = run_cli(["train", "--config", tmp_path / "c.yaml", "--data", imagefolder], capsys)
    assert code == 2 and words in err, err


def test_good_values_pass_through_the_check(tiny_config, imagefolder):
    cfg = tiny_config(imagefolder).replace(epochs=3.0, lr=1, clip_grad=None, input_size=None)
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.optim.clip_grad, cfg.model.input_size) == (3, 1.0, None, None)
    assert isinstance(cfg.optim.epochs, int) and isinstance(cfg.optim.lr, float)


def thin_png(width: int, height: int) -> bytes:
    """A tiny file of a huge, thin picture (PNG compresses a flat image to almost nothing)."""
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(400_000, 100), (40_000_000, 1), (100, 400_000)])
def test_thin_images_are_refused_from_the_header(size, tmp_path, capsys):
    """Before: a 39 KB 400,000 x 100 PNG took 9 s and 1.3 GB once resized for the model, and 40,000,000 x 1
    overflowed the resize (a 500 in the server). Now the header is enough to refuse them, with the limit named."""
    data = thin_png(*size)
    with pytest.raises(ImageTooLargeError, match="times longer than wide, above the limit of 50:1"):
        decode_image(io.BytesIO(data), "thin.png")
    (tmp_path / "thin.png").write_bytes(data)
    ckpt = make_checkpoint(tmp_path / "m.pt")
    code, err = run_cli(["predict", ckpt, tmp_path / "thin.png", "--engine", "torch"], capsys)
    assert code == 2 and "thin.png" in err and "50:1" in err


def test_a_wide_photo_within_the_aspect_limit_still_predicts(tmp_path):
    Image.new("RGB", (2000, 100), (200, 30, 30)).save(tmp_path / "banner.png")  # 20:1
    (row,) = Predictor.load(make_checkpoint(tmp_path / "m.pt")).predict_files([tmp_path / "banner.png"], k=1)
    assert row["top"][0]["prob"] > 0


HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "=HYPERLINK(\"http://x\",\"y\")",
           "@SUM(1+1)"]  # fmt: skip


def test_hostile_class_names_are_escaped_in_the_card_and_csv_files(tmp_path, capsys):
    """Class names from a manifest go into MODEL_CARD.md (escaped: no HTML a Markdown renderer would run) and into
    the CSV files (no cell a spreadsheet reads as a formula); the confusion CSV still reads back as the names."""
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for c, name in enumerate(HOSTILE):
        for i in range(8):
            synthetic_image(c, rng).save(tmp_path / f"{c}_{i}.jpg")
            quoted = '"' + name.replace('"', '""') + '"'
            rows.append(f"{c}_{i}.jpg,{quoted},{'train' if i < 5 else 'test'}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    args = ["train", "--data", tmp_path / "manifest.csv", "--input-size", "64", "--epochs", "2", "--workers", "0",
            "--run-dir", run, "--cache-dir", tmp_path / "cache", "--head", "sgd"]  # fmt: skip
    assert run_cli(args, capsys)[0] == 0
    assert run_cli(["evaluate", run, "--workers", "0", "--report"], capsys)[0] == 0
    card = (run / "MODEL_CARD.md").read_text()
    assert "<script" not in card and "<img" not in card and "&lt;script&gt;" in card
    for name in ("predictions_test.csv", "confusion_test.csv"):
        cells = [c for row in csv.reader((run / name).open()) for c in row]
        assert not [c for c in cells if c.startswith(("=", "+", "-", "@"))], name
    assert read_confusion(run / "confusion_test.csv")[0] == sorted(HOSTILE)
    assert sorted(json.loads((run / "eval_test.json").read_text())["per_class_acc"]) == sorted(HOSTILE)


def test_a_class_folder_linked_from_outside_the_dataset_is_refused_unless_asked(tmp_path, capsys):
    """Before: `data check` followed a link to /etc and read it as a class. Now the link is named; the flag reads it."""
    root = make_imagefolder(tmp_path / "data", num_classes=2, per_class=6)
    outside = make_imagefolder(tmp_path / "elsewhere", num_classes=1, per_class=6) / "class_0"
    (root / "linked").symlink_to(outside, target_is_directory=True)
    code, err = run_cli(["data", "check", root], capsys)
    assert code == 2 and "'" + str(root / "linked") + "' is a link to" in err and "--follow-symlinks" in err
    assert run_cli(["data", "check", root, "--follow-symlinks", "--json"], capsys)[0] == 0
    assert load_dataset(root, follow_symlinks=True).classes == ["class_0", "class_1", "linked"]
    (root / "inside").symlink_to(root / "class_0", target_is_directory=True)  # a link within the dataset is fine
    (root / "linked").unlink()
    assert load_dataset(root).classes == ["class_0", "class_1", "inside"]


def test_a_full_disk_while_saving_is_exit_2_and_keeps_the_last_checkpoint(tmp_path, imagefolder, capsys, monkeypatch):
    """The second epoch's checkpoint meets a full disk the way PyTorch's zip writer does (a RuntimeError that never
    says so): exit 2 with "no space left", the first epoch's last.pt intact, no temporary file left behind."""
    import shutil as shutil_module

    import finegrain.checkpoint as checkpoint_module

    real_save, saves = torch.save, []

    def filling_save(obj, path, *args, **kwargs):
        saves.extend([path] if Path(path).name.startswith(".last.pt.") else [])
        if len(saves) < 2:  # the feature cache, and epoch 1's last.pt and best.pt
            return real_save(obj, path, *args, **kwargs)
        Path(path).write_bytes(b"PK partial")
        monkeypatch.setattr(shutil_module, "disk_usage", lambda p: shutil_module._ntuple_diskusage(10**9, 10**9, 0))
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint_module.torch, "save", filling_save)
    run = tmp_path / "run"
    args = ["train", "--data", imagefolder, "--input-size", "64", "--epochs", "2", "--workers", "0", "--head", "sgd",
            "--run-dir", run, "--cache-dir", tmp_path / "cache"]  # fmt: skip
    code, err = run_cli(args, capsys)
    assert code == 2 and "no space left on" in err and "last.pt" in err and "--run-dir" in err, err
    assert Checkpoint.load(run / "last.pt").epoch == 0  # the first epoch's, whole
    assert not list(run.glob(".*.tmp"))


def test_temp_files_of_a_killed_run_are_removed_when_it_resumes(tmp_path, imagefolder, tiny_config):
    fit(tiny_config(imagefolder, epochs=1))
    run = tmp_path / "run"
    (run / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # what a kill during torch.save leaves
    fit(tiny_config(imagefolder, epochs=2), resume=run)
    assert not list(run.glob(".*.tmp"))


def test_a_failed_train_leaves_no_run_folder_and_names_data(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: the default dataset is not there
    code, err = run_cli(["train", "--run-dir", tmp_path / "new" / "run"], capsys)
    assert code == 2 and "pass --data PATH" in err
    assert not (tmp_path / "new").exists()
    code, err = run_cli(["train"], capsys)  # the default runs/METHOD-TIMESTAMP folder too
    assert code == 2 and not (tmp_path / "runs").exists()


def test_files_a_manifest_names_outside_its_folder_are_allowed_and_listed(tmp_path, capsys):
    data = make_imagefolder(tmp_path / "elsewhere", num_classes=2, per_class=4)
    (tmp_path / "m").mkdir()
    files = sorted(data.rglob("*.jpg"))
    rows = [f"{p},{p.parent.name},train" for p in files]  # absolute paths, outside m/
    (tmp_path / "m" / "manifest.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    assert main(["data", "check", str(tmp_path / "m" / "manifest.csv"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and sorted(report["outside_the_dataset_folder"]) == sorted(map(str, files))
    assert main(["data", "check", str(tmp_path / "m" / "manifest.csv")]) == 0
    assert f"outside the dataset folder: {files[0]}" in capsys.readouterr().out


def test_a_runs_answers_leave_out_the_images_its_skip_bad_left_out(tmp_path, tiny_config):
    """The recipe reads both stages' validation answers (engine/keep_stage.py) from the run's own split, which still
    lists an unreadable image ``--skip-bad`` left out of training: it must be left out there too, not crash the run
    at its end."""
    root = make_imagefolder(tmp_path / "folder")
    (root / "class_0" / "broken.jpg").write_bytes(b"not an image")
    run = fit(tiny_config(root, epochs=1, skip_bad=True)).run_dir
    with (run / "split.csv").open() as f:
        split = next(row["split"] for row in csv.DictReader(f) if row["path"].endswith("broken.jpg"))
    m = run_answers(run, split, workers=0)
    listed = Checkpoint.load(run / "best.pt").dataset().count(split)
    assert len(m["predicted"]) == len(m["labels"]) == listed - 1
