"""CutMix (``--cutmix``, ``engine/addons/cutmix.py``): what a mixed batch and its labels are, and when the budget
recipe turns it on."""

from __future__ import annotations

import json

import pytest
import torch

import finegrain.engine.recipe as recipe
from finegrain.checkpoint import Checkpoint
from finegrain.cli import main
from finegrain.config import TrainConfig
from finegrain.engine.addons.cutmix import CutMixAddOn
from finegrain.errors import ConfigError


def test_a_mixed_image_is_its_own_but_a_rectangle_of_another_and_its_label_says_how_much():
    torch.manual_seed(0)
    x = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 32, 32).clone()  # image i is filled with the value i
    y = torch.tensor([5, 4, 3, 2, 1, 0])
    addon = CutMixAddOn(TrainConfig().replace(cutmix=1.0, freeze_backbone=False))
    addon.num_classes = 7
    mixed = addon.batch(x, images=True)
    targets = addon.criterion(lambda logits, t: t, mixed, (mixed, y), images=True)(torch.zeros(6, 7), y)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    own = (mixed == x).float().mean((1, 2, 3))  # the share of each image still its own
    assert ((own > 0) & (own <= 1)).all() and (own < 1).any()  # something was pasted in
    assert torch.allclose(targets[torch.arange(6), y], own, atol=1e-6)  # its label's weight is its share
    others = {int(v) for i in range(6) for v in mixed[i].unique() if v != i}
    assert others and all(targets[i, y[int(v)]] > 0 for i in range(6) for v in mixed[i].unique() if v != i)


def test_no_mixing_on_cached_features_or_without_the_draw():
    x = torch.randn(4, 3, 8, 8)
    addon = CutMixAddOn(TrainConfig().replace(cutmix=1.0, freeze_backbone=False))
    assert addon.batch(x, images=False) is x and addon.mixing is None
    addon = CutMixAddOn(TrainConfig().replace(cutmix=1e-9, freeze_backbone=False))
    assert addon.batch(x, images=True) is x


def test_cutmix_is_refused_where_the_loss_trains_on_unmixed_labels():
    with pytest.raises(ConfigError, match="--cutmix mixes the labels"):
        TrainConfig().replace(cutmix=0.5, center_loss=0.01, freeze_backbone=False)


@pytest.mark.parametrize(
    ("given", "epochs", "options", "used"),
    [
        (None, recipe.CUTMIX_MIN_EPOCHS, {}, recipe.RECIPE_CUTMIX),  # auto, a long schedule: on
        (None, recipe.CUTMIX_MIN_EPOCHS - 1, {}, None),  # a shorter one: off
        (0.0, recipe.CUTMIX_MIN_EPOCHS, {}, 0.0),  # --cutmix 0 given: off
        (0.25, 1, {}, 0.25),  # given: as given
        (None, recipe.CUTMIX_MIN_EPOCHS, {"center_loss": 0.01}, None),  # center loss trains on unmixed labels
    ],
)
def test_the_recipe_cutmixes_long_whole_network_schedules_where_the_loss_allows(given, epochs, options, used):
    cfg = TrainConfig().replace(cutmix=given, freeze_backbone=False, **options)
    assert recipe.with_cutmix(cfg, epochs).augment.cutmix == used


@pytest.mark.usefixtures("budget_clock_stopped")
def test_a_long_budgeted_fine_tuning_is_cut_mixed(imagefolder, tiny_config, tmp_path, monkeypatch):
    """A mocked fast machine plans many whole-network epochs: recipe.json and the stage's config say CutMix, and
    the training batches were mixed."""
    monkeypatch.setattr(recipe, "finetune_speed", lambda *a, train_stages=0, **k: 1e6 if not train_stages else 1e-9)
    mixed = []
    batch = CutMixAddOn.batch
    monkeypatch.setattr(CutMixAddOn, "batch", lambda self, x, images: mixed.append(1) or batch(self, x, images))
    run = tmp_path / "b"
    recipe.train_within_budget(tiny_config(imagefolder, budget=0.25, run_dir=str(run)))
    plan = json.loads((run / "recipe.json").read_text())
    assert plan["decision"]["kind"] == "whole" and plan["decision"]["finetune_epochs"] >= recipe.CUTMIX_MIN_EPOCHS
    assert plan["decision"]["cutmix"] == recipe.RECIPE_CUTMIX and mixed
    assert Checkpoint.load(run / "finetune" / "last.pt").train_config().augment.cutmix == recipe.RECIPE_CUTMIX


def test_a_config_file_may_say_auto_and_nothing_else_that_is_not_a_number():
    assert TrainConfig.from_dict({"cutmix": "auto", "freeze_backbone": False}).augment.cutmix is None
    assert TrainConfig.from_dict({"augment": {"cutmix": 0.3}, "freeze_backbone": False}).augment.cutmix == 0.3
    with pytest.raises(ConfigError, match="cutmix: expected a number"):
        TrainConfig.from_dict({"cutmix": "lots"})
    with pytest.raises(ConfigError, match="lr: expected a number"):
        TrainConfig.from_dict({"lr": "auto"})  # auto only where the option reads it


def test_the_command_line_names_what_cutmix_takes(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--cutmix", "lots"])
    assert "--cutmix: expected a number or auto, got 'lots'" in capsys.readouterr().err
