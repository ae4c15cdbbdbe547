"""Small photos train at a smaller input in the budgeted recipe (``data/image_sizes.py``, ``engine/recipe.py``)."""

from __future__ import annotations

import json

import numpy as np

from finegrain.checkpoint import Checkpoint
from finegrain.data import Sample
from finegrain.data.image_sizes import input_for, typical_side
from finegrain.engine.recipe import train_within_budget

from .conftest import synthetic_image


def _photos(root, side: int, classes: int = 3, per_class: int = 8):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            synthetic_image(c, rng, size=64).resize((side, side)).save(root / f"class_{c}" / f"{i}.png")
    return root


def test_the_typical_side_is_the_median_longer_side_and_asks_for_four_times_it(tmp_path):
    paths = []
    for i, (w, h) in enumerate([(30, 20), (16, 32), (40, 8), (500, 300), (32, 32)]):
        paths.append(tmp_path / f"{i}.png")
        synthetic_image(0, np.random.default_rng(i)).resize((w, h)).save(paths[-1])
    samples = [Sample(p, 0, "train") for p in paths]
    assert typical_side(samples) == 32  # longer sides 30, 32, 40, 500, 32
    streamed = [Sample(p, 0, "train", data=p.read_bytes()) for p in paths]
    assert typical_side(streamed) is None
    assert [input_for(s, 224) for s in (32, 20, 50, 300, None)] == [128, 96, 224, 224, 224]


def test_a_budget_run_on_small_photos_trains_at_the_smaller_input_and_says_so(tmp_path, tiny_config):
    data = _photos(tmp_path / "data", side=24)
    cfg = tiny_config(data, input_size=None, budget=0.2, run_dir=str(tmp_path / "small"))
    result = train_within_budget(cfg)
    decision = json.loads((result.run_dir / "recipe.json").read_text())["decision"]
    assert (decision["input_size"], decision["photo_side"], decision["native_input_size"]) == (96, 24, 224)
    assert Checkpoint.load(result.run_dir / "best.pt").preprocess.input_size == 96
    given = train_within_budget(tiny_config(data, input_size=64, budget=0.2, run_dir=str(tmp_path / "given")))
    assert "input_size" not in json.loads((given.run_dir / "recipe.json").read_text())["decision"]
    assert Checkpoint.load(given.run_dir / "best.pt").preprocess.input_size == 64
