"""Class side-information (class_info folders), the textprior method, and classes added without training photos."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from finegrain.checkpoint import Checkpoint
from finegrain.cli import main
from finegrain.data.class_info import class_key, find_class_info, load_class_info
from finegrain.data.loading import open_image
from finegrain.engine.train import fit
from finegrain.errors import ConfigError, DataError
from finegrain.explain import explain
from finegrain.export import export_onnx
from finegrain.models import create_model
from finegrain.models.class_embed import EmbeddingSpec, embed_classes
from finegrain.predict import Predictor, with_added_classes
from finegrain.serve.app import ServeSettings, create_app

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 40), "blue": (40, 60, 220), "yellow": (230, 200, 30)}
SHAPES = ("square", "disc")
UNSEEN = ("red_disc", "green_square")  # never trained on: known by their attributes only


def shape_image(colour: str, shape: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    img = Image.fromarray(rng.integers(60, 140, size=(size, size, 3), dtype=np.uint8))
    r = size // 4
    cx, cy = rng.integers(r, size - r, size=2)
    box = (cx - r, cy - r, cx + r, cy + r)
    (ImageDraw.Draw(img).rectangle if shape == "square" else ImageDraw.Draw(img).ellipse)(box, fill=COLOURS[colour])
    return img


def attribute_table(path: Path) -> Path:
    """One row per colour x shape class: one-hot colour and shape attributes."""
    path.mkdir(parents=True, exist_ok=True)
    with (path / "classes.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", *COLOURS, *SHAPES])
        for colour in COLOURS:
            for shape in SHAPES:
                w.writerow(
                    [f"{colour}_{shape}", *(int(c == colour) for c in COLOURS), *(int(s == shape) for s in SHAPES)]
                )
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """An ImageFolder of the six seen colour x shape classes, with its class_info, and test photos of all eight."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for colour in COLOURS:
        for shape in SHAPES:
            name = f"{colour}_{shape}"
            for split, n in (("data", 16), ("test", 8)):
                if split == "data" and name in UNSEEN:
                    continue
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    shape_image(colour, shape, rng).save(folder / f"{i}.png")
    attribute_table(root / "data" / "class_info")
    return root


def test_class_info_reads_text_images_and_attributes(tmp_path):
    info_dir = attribute_table(tmp_path / "info")
    (info_dir / "red_square.txt").write_text("  a red\nsquare  ")
    Image.new("RGB", (8, 8)).save(info_dir / "purple_star.png")
    info = load_class_info(info_dir)
    assert info.descriptions == {"red_square": "a red square"}
    assert info.attributes["blue_disc"] == [0, 0, 1, 0, 0, 1]
    assert set(info.images) == {"purple_star"}
    classes = ["001.Red_Square", "blue-disc", "orange_triangle"]
    assert info.match(classes) == {"001.Red_Square": "red_square", "blue-disc": "blue_disc"}
    cov = info.coverage(classes)
    assert cov["missing"] == ["orange_triangle"] and "purple_star" in cov["new_classes"]
    assert cov["classes_with"] == {"description": 1, "reference_image": 0, "attributes": 2}
    assert class_key("001.Black_footed_Albatross") == class_key("black footed albatross")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("name,a\nx,1\n", "header starting with 'class'"),
        ("class,a,b\nx,1\n", "2 columns, the header has 3"),
        ("class,a\nx,high\n", "'a' of class 'x' is 'high', not a number"),
        ("class,a\nx,1\nx,2\n", "listed twice"),
    ],
)
def test_bad_class_tables_are_named(tmp_path, content, message):
    (tmp_path / "classes.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        load_class_info(tmp_path)


def test_missing_or_empty_class_info_is_refused(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        find_class_info(tmp_path, tmp_path / "nope")
    with pytest.raises(DataError, match="nothing describes a class"):
        load_class_info(tmp_path)
    (tmp_path / "x.txt").write_text(" ")
    with pytest.raises(DataError, match="empty"):
        load_class_info(tmp_path)


def test_class_without_attributes_is_named(tmp_path):
    info = load_class_info(attribute_table(tmp_path))
    spec = EmbeddingSpec.for_info(info)
    assert spec.text is None and spec.dim == 6
    with pytest.raises(DataError, match="without attributes: purple_star"):
        embed_classes(spec, ["red_square", "purple_star"], info)


def test_a_method_without_class_prior_cannot_add_classes():
    model = create_model("baseline", num_classes=2, pretrained=False)
    with pytest.raises(ConfigError, match="--method textprior"):
        model.add_classes(torch.zeros(1, 3))


@pytest.mark.slow
def test_textprior_learns_and_scores_unseen_classes_from_attributes(shapes, tiny_config):
    """Trained on six colour x shape classes; two more added from their attribute rows alone are recognised."""
    cfg = tiny_config(shapes / "data", method="textprior", freeze_backbone=True, cache_features=True, epochs=30,
                      val_fraction=0.0, test_fraction=0.0, batch_size=16)  # fmt: skip
    fit(cfg)
    ckpt = Checkpoint.load(Path(cfg.run.run_dir) / "best.pt")
    assert ckpt.model_kwargs["embedding"]["attributes"] == [*COLOURS, *SHAPES]
    assert "class_embed" not in ckpt.model_kwargs  # a buffer of the state dict, not an argument
    predictor = Predictor.from_checkpoint(ckpt.path, device="cpu")
    assert predictor.add_classes(shapes / "data" / "class_info") == sorted(UNSEEN)
    assert len(predictor.classes) == 8
    hits = total = seen_hits = seen_total = 0
    for folder in sorted((shapes / "test").iterdir()):
        results = predictor.predict_files(sorted(folder.iterdir()), k=8)
        if folder.name in UNSEEN:  # zero-shot: among the unseen classes (chance: 50%)
            best = [next(t["class"] for t in r["top"] if t["class"] in UNSEEN) for r in results]
            hits, total = hits + sum(b == folder.name for b in best), total + len(best)
        else:
            seen_hits += sum(r["top"][0]["class"] == folder.name for r in results)
            seen_total += len(results)
    assert seen_hits / seen_total >= 0.8
    assert hits / total >= 0.75, f"zero-shot top-1 among unseen classes {hits}/{total}"
    photos = [open_image(p) for p in sorted((shapes / "test" / "blue_square").iterdir())]
    right = [e for e in explain(predictor, photos, k=3) if e.top[0]["class"] == "blue_square"]
    assert len(right) >= 0.8 * len(photos)
    for e in right:  # the attributes that drove each answer are the class's own
        assert e.evidence and {a["name"] for a in e.evidence[:2]} == {"blue", "square"}


@pytest.mark.slow
def test_reference_image_adds_a_class_by_imprinting(shapes, tiny_config, tmp_path):
    """A class known only by one reference photo (no attributes) is recognised on photos like it."""
    cfg = tiny_config(shapes / "data", method="textprior", freeze_backbone=True, cache_features=True, epochs=30,
                      val_fraction=0.0, test_fraction=0.0, batch_size=16, run_dir=str(tmp_path / "run"))  # fmt: skip
    fit(cfg)
    info = attribute_table(tmp_path / "info")
    rng = np.random.default_rng(5)
    Image.Image.save(shape_image("yellow", "square", rng), info / "yellow_star.png")  # no attribute row
    predictor = Predictor.from_checkpoint(Path(cfg.run.run_dir) / "best.pt", device="cpu")
    assert "yellow_star" in predictor.add_classes(info)
    photos = sorted((shapes / "test" / "yellow_square").iterdir())
    top = [r["top"][0]["class"] for r in predictor.predict_files(photos, k=1)]
    assert sum(t in ("yellow_star", "yellow_square") for t in top) >= 0.75 * len(top)
    assert "yellow_star" in top
    path, added = with_added_classes(Path(cfg.run.run_dir) / "best.pt", info)  # baked into an ONNX file
    onnx = Predictor.load(export_onnx(path)["path"])
    assert onnx.classes[-len(added) :] == added
    assert [r["top"][0]["class"] for r in onnx.predict_files(photos, k=1)] == top
    settings = ServeSettings(device="cpu", class_info=str(info))  # the service loads the added classes too
    with TestClient(create_app(Path(cfg.run.run_dir) / "best.pt", settings)) as client:
        assert "yellow_star" in client.get("/v1/model").json()["classes"]


def test_data_check_reports_class_info(shapes, capsys):
    assert main(["data", "check", str(shapes / "data"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_classes"] == 6  # class_info/ is not a class
    info = report["class_info"]
    assert info["classes_with"]["attributes"] == 6 and info["missing"] == []
    assert sorted(info["new_classes"]) == sorted(UNSEEN)
