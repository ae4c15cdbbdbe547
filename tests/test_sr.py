"""Learned super-resolution: starts as bicubic, beats it after training, and plugs into training and prediction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from finegrain.checkpoint import Checkpoint
from finegrain.cli import main
from finegrain.config import TrainConfig
from finegrain.data.loading import open_image
from finegrain.data.transforms import eval_transform
from finegrain.engine.sr import load_sr, psnr, train_sr
from finegrain.errors import CheckpointError, ConfigError
from finegrain.models.sr import ESPCN, SRAugment, SRUpscaleSmall, sr_upscale, to_tensor

from .conftest import make_checkpoint


def _scene(rng: np.random.Generator, size: int = 96) -> Image.Image:
    """Sharp-edged shapes and thin lines, drawn at 4x and reduced (antialiased, like a photo): the high
    frequencies that bicubic upscaling blurs."""
    big = size * 4
    img = Image.new("RGB", (big, big), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, big, 2)
        x1, y1 = x0 + rng.integers(16, 160), y0 + rng.integers(16, 160)
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(4, 12)))
    return img.resize((size, size), Image.LANCZOS)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir()
        for i in range(20):
            _scene(rng).save(root / f"c{c}" / f"{i}.png")
    return root


def test_an_untrained_model_is_bicubic_upscaling():
    x = torch.rand(1, 3, 12, 16)
    for scale in (2, 4):
        up = ESPCN(scale)(x)
        assert up.shape == (1, 3, 12 * scale, 16 * scale)
        assert torch.allclose(up, F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False))


@pytest.mark.parametrize("scale", [2, 4])
def test_trained_sr_beats_bicubic_on_held_out_images(scenes, tmp_path, scale):
    m = train_sr(str(scenes), scale=scale, steps=150, patch=48, run_dir=tmp_path, eval_images=8, val_fraction=0.2)
    assert m["images"] == 6  # held-out: the validation split (3 per class), never trained on
    assert m["psnr"] > m["psnr_bicubic"] + 0.05, m  # measured +0.25 dB (x2) and +0.12 dB (x4) at 150 steps
    assert load_sr(tmp_path).scale == scale and (tmp_path / "sr_metrics.json").is_file()


def test_psnr_of_a_known_error():
    a = torch.zeros(3, 4, 4)
    assert psnr(a, a + 0.1) == pytest.approx(20.0)


def test_sr_transforms_keep_training_size_and_enlarge_only_small_images():
    model = ESPCN(2)
    img = Image.new("RGB", (50, 30), (10, 200, 30))
    assert SRAugment(model, p=1.0)(img).size == (50, 30)
    assert SRUpscaleSmall(model, min_side=100)(img).size == (200, 120)  # twice x2: shorter side 30 -> 120
    assert SRUpscaleSmall(model, min_side=20)(img).size == (50, 30)
    assert sr_upscale(model, img).size == (100, 60)
    assert torch.allclose(to_tensor(img)[:, 0, 0], torch.tensor([10, 200, 30]) / 255)


def test_sr_options_are_checked_and_a_classifier_is_not_an_sr_model(tmp_path):
    with pytest.raises(ConfigError, match="sr-model"):
        TrainConfig().replace(sr_aug=0.5).validate()
    with pytest.raises(ConfigError, match="no-cache-features"):
        TrainConfig().replace(sr_aug=0.5, sr_model="x.pt").check_images_for_augmentation()
    with pytest.raises(CheckpointError, match="not a super-resolution model"):
        load_sr(make_checkpoint(tmp_path / "c.pt"))


def test_sr_cli_trains_upscales_and_predict_uses_it(scenes, tmp_path, tiny_config, capsys):
    from finegrain.engine.train import fit

    run = tmp_path / "sr"
    assert main(["sr", "train", str(scenes), "--steps", "20", "--patch", "48", "--run-dir", str(run)]) == 0
    assert "PSNR" in capsys.readouterr().out
    image = next(scenes.rglob("*.png"))
    assert main(["sr", "upscale", str(run), str(image), "--out", str(tmp_path / "up")]) == 0
    assert Image.open(tmp_path / "up" / f"{image.stem}.png").size == (192, 192)
    # a classifier trained with SR augmentation, then predicting with small inputs enlarged by SR
    cfg = tiny_config(scenes, epochs=1, cache_features=False, sr_aug=0.5, sr_model=str(run / "sr.pt"))
    ckpt = fit(cfg).run_dir / "last.pt"
    capsys.readouterr()
    assert main(["predict", str(ckpt), str(image), "--sr-model", str(run), "--sr-below", "128", "--json"]) == 0
    with_sr = {t["class"]: t["prob"] for t in json.loads(capsys.readouterr().out)[0]["top"]}
    assert main(["predict", str(ckpt), str(image), "--json"]) == 0
    plain = {t["class"]: t["prob"] for t in json.loads(capsys.readouterr().out)[0]["top"]}
    saved = Checkpoint.load(ckpt)  # the reference: the image enlarged by the SR model by hand, then the classifier
    enlarged = sr_upscale(load_sr(run / "sr.pt"), open_image(image))
    with torch.inference_mode():
        probs = saved.build_model()(eval_transform(saved.preprocess)(enlarged)[None]).softmax(1)[0]
    assert with_sr == pytest.approx({c: float(probs[saved.classes.index(c)]) for c in with_sr}, abs=1e-5)
    assert max(abs(with_sr[c] - plain[c]) for c in with_sr) > 1e-4  # without SR the answer is another
