"""--mirror-check (the budgeted recipe's): mirroring is decided after epochs without it (3, a tenth of a long run;
one in these 2-epoch runs), from the network's answers on mirrored validation images. Classes that are mirror images
of each other keep it off; ordinary ones get it back after the check. (Resume across the decision:
tests/test_addons.py.)"""

import json

import numpy as np
import pytest

from finegrain.engine import recipe
from finegrain.engine.addons.mirror_check import MirrorCheckAddOn
from finegrain.engine.train import fit

from .conftest import synthetic_image
from .test_mirror import stripes


def folder_of(root, draw, per_class: int = 40):
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            draw(c, rng).save(root / f"class_{c}" / f"{i}.png")
    return root


def mirror_classes(c, rng):  # classes 0 and 1 are each other's mirror image; 2 and 3 look the same mirrored
    return stripes(c, rng, 64) if c < 2 else synthetic_image(c, rng, 64)


def run(tmp_path, tiny_config, draw):
    data = folder_of(tmp_path / "data", draw)
    cfg = tiny_config(data, freeze_backbone=False, mirror_check=True, epochs=2, lr=1e-3, warmup_epochs=0,
                     val_fraction=0.3)  # fmt: skip
    result = fit(cfg)
    return result, json.loads((result.run_dir / "mirror.json").read_text())


@pytest.mark.slow
def test_mirror_image_classes_keep_mirroring_off(tmp_path, tiny_config):
    result, report = run(tmp_path, tiny_config, mirror_classes)
    assert [p["names"] for p in report["pairs"]] == [["class_0", "class_1"]], report
    assert report["candidates"][0]["names"] == ["class_0", "class_1"] and report["candidates"][0]["pooled"] >= 0.5
    assert report["hflip"] == 0.0
    assert [r["hflip"] for r in result.history] == [0.0, 0.0]


@pytest.mark.slow
def test_ordinary_classes_get_mirroring_back_after_the_first_epoch(tmp_path, tiny_config):
    result, report = run(tmp_path, tiny_config, lambda c, rng: synthetic_image(c, rng, 64))
    assert report["pairs"] == [] and report["hflip"] == 0.5
    assert [r["hflip"] for r in result.history] == [0.0, 0.5]


@pytest.mark.parametrize(
    ("given", "expected"), [((), True), (("hflip",), False), (("mirror_check",), False), (("budget",), True)]
)
def test_the_budgeted_recipe_decides_mirroring_unless_the_user_did(given, expected, tiny_config, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(recipe, "train_within_budget", lambda cfg, started=None: seen.append(cfg))
    cfg = tiny_config(tmp_path, budget=None) if "budget" not in given else tiny_config(tmp_path, budget=3.0)
    recipe.train(cfg.replace(epochs=3), given)
    assert seen and seen[0].augment.mirror_check is expected


@pytest.mark.parametrize(("epochs", "after"), [(2, 1), (6, 2), (9, 3), (39, 3), (52, 5), (87, 8), (103, 10), (164, 10)])
def test_a_long_run_asks_after_a_tenth_of_its_epochs(epochs, after, tiny_config, tmp_path):
    """Three epochs were too few on a 30-minute gtsrb run (100 planned, 87 run): no pair found, mirroring on, -10 pt."""
    assert MirrorCheckAddOn(tiny_config(tmp_path, epochs=epochs)).after == after
