"""``--train-on-val`` (engine/addons/train_on_val.py): the validation images are trained on as well, while the saved
split still lists them as validation and leaves the test images alone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from finegrain.checkpoint import Checkpoint
from finegrain.data import load_dataset
from finegrain.data.shards import write_shards
from finegrain.engine.recipe import train_within_budget
from finegrain.engine.train import fit
from finegrain.errors import ConfigError
from finegrain.run_layout import RunDir

from .conftest import make_imagefolder


def _split_rows(run_dir):
    with open(run_dir / RunDir.SPLIT, newline="") as f:
        return sorted(tuple(r) for r in csv.reader(f))


def test_validation_images_are_trained_on_and_the_saved_split_is_unchanged(tmp_path, tiny_config):
    data = make_imagefolder(tmp_path / "data", num_classes=3, per_class=10)
    plain = fit(tiny_config(data, run_dir=str(tmp_path / "plain"), epochs=1))
    refit = fit(tiny_config(data, run_dir=str(tmp_path / "refit"), epochs=1, train_on_val=True))
    assert plain.counts["val"] > 0
    assert refit.counts["train"] == plain.counts["train"] + plain.counts["val"]
    assert refit.counts["val"] == plain.counts["val"]  # still validated on (as seen images)
    assert _split_rows(tmp_path / "refit") == _split_rows(tmp_path / "plain")


@pytest.mark.slow
def test_the_budget_recipe_keeps_them_from_its_head_and_plans_for_them(tmp_path, tiny_config):
    data = make_imagefolder(tmp_path / "data", num_classes=3, per_class=10)
    result = train_within_budget(tiny_config(data, head="auto", budget=0.5, train_on_val=True))
    recipe = json.loads((result.run_dir / RunDir.RECIPE).read_text())
    head_dir = Path(recipe["stages"]["head"]["run_dir"])
    head = Checkpoint.load(head_dir / RunDir.BEST).dataset()
    assert yaml.safe_load((head_dir / RunDir.CONFIG).read_text())["labels"]["train_on_val"] is False
    assert recipe["decision"]["train_images"] == head.count("train") + head.count("val")


def test_nothing_to_add_or_a_stream_is_refused_by_name(tmp_path, tiny_config):
    data = make_imagefolder(tmp_path / "data", num_classes=3, per_class=10)
    with pytest.raises(ConfigError, match="no validation images to train on.*drop --train-on-val"):
        fit(tiny_config(data, epochs=1, val_fraction=0.0, train_on_val=True))
    write_shards(load_dataset(data, seed=0, val_fraction=0.2), tmp_path / "shards", shard_size=8, progress=False)
    shards = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    with pytest.raises(ConfigError, match="--train-on-val.*streamed shards"):
        fit(tiny_config("wds:" + "::".join(shards), epochs=1, cache_features=False, train_on_val=True))
