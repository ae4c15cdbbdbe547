"""`finegrain classes add`: new classes from words and one photo, added to a default-head model without breaking the
classes it knows (engine/new_classes.py, engine/add_classes.py)."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.cli import main
from finegrain.engine import add_classes as add_classes_module
from finegrain.engine.new_classes import fit_calibration, gated_predictions, prototypes
from finegrain.engine.train import fit
from finegrain.export import export_onnx
from finegrain.models.added_classes import AddedClassesLinear
from finegrain.predict import Predictor

from .conftest import made_once, tiny_config_factory
from .test_textprior import COLOURS, SHAPES, attribute_table, shape_image

NEW = ("yellow_disc", "yellow_square")  # never trained on: one reference photo and their attribute rows
YELLOW = {"yellow_disc": ("yellow", "disc"), "yellow_square": ("yellow", "square")}  # their reference photos
SIZE = 128  # at 64 px frozen ImageNet features hardly see colour: one photo of a yellow square took blue squares


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A default-head (probe) model on six colour x shape classes (half of their photos held out for validation: the
    check of `classes add` needs enough of them), test photos of all eight, and its accuracy on the known classes'
    test photos among the six (before anything is added)."""
    return made_once(tmp_path_factory, "add", _train)


def _train(root: Path):
    rng = np.random.default_rng(0)
    for colour in COLOURS:
        for shape in SHAPES:
            name = f"{colour}_{shape}"
            for split, n in (("data", 0 if name in NEW else 40), ("test", 16 if name in NEW else 8)):
                if n == 0:
                    continue
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    shape_image(colour, shape, rng, size=SIZE).save(folder / f"{i}.png")
    cfg = tiny_config_factory(root)(root / "data", head="probe", val_fraction=0.5, test_fraction=0.0, input_size=SIZE)
    run = fit(cfg).run_dir
    before = Predictor.from_checkpoint(run / "best.pt", device="cpu")
    known = [f for f in sorted((root / "test").iterdir()) if f.name not in NEW]
    right = sum(r["top"][0]["class"] == f.name for f in known for r in before.predict_files(sorted(f.iterdir()), k=1))
    return root, run, right / sum(len(list(f.iterdir())) for f in known)


def info_with_photos(path: Path, photos: dict[str, tuple[str, str]]) -> Path:
    """Attribute rows of all eight classes, and one reference photo for each class of ``photos`` (drawn as the
    given colour and shape)."""
    info = attribute_table(path)
    rng = np.random.default_rng(7)
    for name, (colour, shape) in photos.items():
        Image.Image.save(shape_image(colour, shape, rng, size=SIZE), info / f"{name}.png")
    return info


def test_added_classes_keep_the_known_ones_and_are_recognised(trained, tmp_path):
    root, run, known_before = trained
    info = info_with_photos(tmp_path / "info", YELLOW)
    out = tmp_path / "added.pt"
    assert main(["classes", "add", str(run), str(info), "--out", str(out)]) == 0
    predictor = Predictor.from_checkpoint(out, device="cpu")
    assert predictor.classes[-2:] == sorted(NEW) and len(predictor.classes) == 8
    known_right = known_total = new_right = new_total = 0
    for folder in sorted((root / "test").iterdir()):
        top = [r["top"][0]["class"] for r in predictor.predict_files(sorted(folder.iterdir()), k=1)]
        if folder.name in NEW:
            new_right, new_total = new_right + top.count(folder.name), new_total + len(top)
        else:
            known_right, known_total = known_right + top.count(folder.name), known_total + len(top)
    # at most 3 points lost, rounded up to whole photos (48 known test photos: 1 photo is 2.1 pt)
    assert known_right / known_total >= known_before - 2 / known_total, (known_right, known_total, known_before)
    # 32 photos of the new classes among 8 classes: 11 or more right by chance has probability < 0.001
    assert new_total == 32 and new_right >= 11, f"new classes: {new_right}/{new_total} right among 8 (chance 12.5%)"
    # the gated head exports: the ONNX file gives the checkpoint's answers on every test photo
    photos = sorted(p for folder in sorted((root / "test").iterdir()) for p in folder.iterdir())
    onnx = Predictor.load(export_onnx(out)["path"])
    assert onnx.classes == predictor.classes
    top = lambda p: [r["top"][0]["class"] for r in p.predict_files(photos, k=1)]  # noqa: E731
    assert top(onnx) == top(predictor)


def test_classes_that_would_break_the_known_ones_are_refused(trained, tmp_path, capsys, monkeypatch):
    """A calibration that lets the new classes outscore the known ones on half of the known photos (the calibration
    itself never chooses that: the test above): the cross-fitted check on validation photos measures the loss,
    the command exits 2 naming it, and writes nothing."""
    _, run, _ = trained
    fit = add_classes_module.fit_calibration
    monkeypatch.setattr(add_classes_module, "fit_calibration",
                        lambda *a, **k: replace(fit(*a, **k), known_share=0.5))  # fmt: skip
    info = info_with_photos(tmp_path / "info", YELLOW)
    out = tmp_path / "added.pt"
    assert main(["classes", "add", str(run), str(info), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pt of top-1" in err and "--max-loss" in err and not out.exists()
    lost = float(err.split("cost the known classes ")[1].split(" pt")[0])
    assert lost > 3.0
    assert main(["classes", "add", str(run), str(info), "--out", str(out), "--max-loss", str(lost + 0.5)]) == 0


def test_gated_head_predicts_what_the_gate_decides():
    """The head's logits (known logits, then top known logit + sharpness x gate margin) put the argmax exactly where
    the two-step decision does: the known head's argmax unless a new prototype beats every known one by more than
    the threshold, then that nearest new class."""
    gen = torch.Generator().manual_seed(0)
    head = AddedClassesLinear(16, known=5, added=3)
    for layer in (head.known, head.gate, head.added):
        torch.nn.init.normal_(layer.weight, generator=gen)
    head.threshold.fill_(0.7)
    head.sharpness.fill_(0.3)
    x = torch.randn(500, 16, generator=gen)
    margin = head.added(x) - head.gate(x).max(1, keepdim=True).values
    expected = gated_predictions(head.known(x), margin.max(1).values, margin.argmax(1), 0.7)
    got = head(x).argmax(1)
    assert torch.equal(got, expected)
    assert 50 < int((got >= 5).sum()) < 450  # both branches taken


def test_calibration_on_pseudo_splits_keeps_known_classes_and_finds_new_ones():
    """Clustered features: the calibrated new-class scores cost the known classes at most the allowed 2% on the
    pseudo-splits, and the new classes are found far above chance there."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(20, 64, generator=gen), dim=1)
    y = torch.arange(400) % 20
    x = torch.nn.functional.normalize(centres[y] + 0.08 * torch.randn(400, 64, generator=gen), dim=1)
    cal = fit_calibration(x, y, centres, c=10.0, n_new=5, splits=4)  # the words: the true centres (perfect words)
    assert cal.pseudo["known_before"] - cal.pseudo["known_after"] <= 0.02
    assert cal.pseudo["new"] >= 0.8, cal.pseudo  # 4 pseudo-new among 20: chance 5%
    words_only = prototypes(torch.zeros(2, 64), centres[:2], beta=0.5)  # no photo: the words alone
    assert torch.allclose(words_only, centres[:2], atol=1e-6)
