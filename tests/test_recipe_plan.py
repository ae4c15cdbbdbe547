"""The budgeted recipe's choice of fine-tuning, from timings (mocked: the machine's speed is the input)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from PIL import Image

import finegrain.engine.recipe as recipe
import finegrain.engine.task as task_module
from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig
from finegrain.data.records import Sample
from finegrain.data.transforms import Preprocess
from finegrain.engine.recipe import PARTIAL_STAGES, WHOLE_MIN_EPOCHS, plan_finetuning, train_within_budget


@pytest.mark.parametrize(
    ("whole_img_s", "stages_img_s", "cache_per_view", "kind", "epochs", "views"),
    [
        (20, 100, 10, "whole", 12, 0),  # 50 s whole epochs: 12 of 600 s fit, enough
        (10, 100, 10, "stages", 56, 4),  # 100 s whole epochs: 6 fit, too few; the maps' 10 s epochs after a 40 s cache
        (5, 10, 120, "stages", 3, 2),  # a costly cache: 2 views (240 s) leave three 100-s epochs, 3 views only 2
        (2, 100, 600, "whole", 1, 0),  # the cache alone takes all the time: one whole epoch still fits
        (1, 100, 600, "none", 0, 0),  # nothing fits
        (1, 1e-9, float("inf"), "none", 0, 0),  # partial fine-tuning not possible (add-ons), no whole epoch fits
    ],
)
def test_plan_from_measured_speeds(whole_img_s, stages_img_s, cache_per_view, kind, epochs, views):
    assert WHOLE_MIN_EPOCHS == 12  # the cases above are written for it
    plan = plan_finetuning(600, n_train=1000, n_val=0, whole_img_s=whole_img_s, stages_img_s=stages_img_s,
                           cache_s=lambda v: v * cache_per_view, max_views=4)  # fmt: skip
    assert (plan["kind"], plan["finetune_epochs"], plan["map_views"]) == (kind, epochs, views)
    assert plan["train_stages"] == (PARTIAL_STAGES if kind == "stages" else 0)


def test_the_loaders_time_counts_against_whole_network_epochs():
    """Decoding and augmenting (30 ms an image) turn 50-s epochs (12 fit) into 80-s ones (7 fit: too few): the maps,
    which decode once for their cache, are chosen instead."""
    kw = dict(n_train=1000, n_val=0, whole_img_s=20, stages_img_s=100, cache_s=lambda v: v * 10, max_views=4)
    assert plan_finetuning(600, **kw)["kind"] == "whole"
    plan = plan_finetuning(600, **kw, load_s=0.03)
    assert (plan["kind"], plan["whole_epochs_fit"], plan["finetune_epochs"]) == ("stages", 7, 56)


@pytest.mark.usefixtures("budget_clock_stopped")
def test_budget_fine_tunes_the_last_stages_on_maps_on_a_slow_machine(imagefolder, tiny_config, tmp_path, monkeypatch):
    """Whole-network fine-tuning measured too slow for WHOLE_MIN_EPOCHS, partial fine-tuning fast: the recipe trains
    the last stages on cached maps, says so in recipe.json, and the run holds the stage it keeps."""
    speeds = {0: 0.1, PARTIAL_STAGES: 1e6}  # img/s by train_stages: one whole epoch takes minutes
    monkeypatch.setattr(recipe, "finetune_speed", lambda *a, train_stages=0, **k: speeds[train_stages])
    monkeypatch.setattr(recipe, "cache_speed", lambda *a, **k: 1e6)
    cfg = tiny_config(imagefolder, head="auto", budget=0.25, run_dir=str(tmp_path / "b"), map_views=2)
    result = train_within_budget(cfg)
    plan = json.loads((result.run_dir / "recipe.json").read_text())
    assert plan["decision"]["kind"] == "stages" and plan["decision"]["whole_epochs_fit"] == 0
    assert plan["stages"]["finetune"]["kind"] == "stages" and plan["stages"]["finetune"]["epochs"] >= 1
    tuned = Checkpoint.load(tmp_path / "b" / "finetune" / "last.pt").train_config()
    assert tuned.model.train_stages == PARTIAL_STAGES and tuned.features.map_views == plan["decision"]["map_views"]
    kept = plan["stages"][plan["kept"]]  # (which stage is kept: tests/test_probe.py, with scores it sets)
    assert Checkpoint.load(result.run_dir / "best.pt").metrics["val_top1"] == kept["val_top1"]


@pytest.mark.parametrize(("test_size", "crop"), [(224, 176), (128, 96), (64, 48), (32, 32)])
def test_the_recipe_trains_on_crops_of_four_fifths_of_the_test_input(test_size, crop):
    assert recipe.train_size(test_size) == crop


@pytest.mark.usefixtures("budget_clock_stopped")
def test_whole_network_fine_tuning_trains_on_smaller_crops_and_tests_at_the_input(imagefolder, tiny_config, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    """Whole-network fine-tuning fits (fast machine, partial fine-tuning slower): its training batches are crops of
    ``train_size(64)`` px, its validation and its checkpoint's input stay at 64; ``--train-input-size`` overrides."""
    monkeypatch.setattr(recipe, "finetune_speed", lambda *a, train_stages=0, **k: 1e6 if not train_stages else 1e-9)
    seen = []
    original = task_module.image_datasets

    def image_datasets(ctx):
        train_set, val_set = original(ctx)
        seen.append((tuple(train_set[0][0].shape[-2:]), tuple(val_set[0][0].shape[-2:])))
        return train_set, val_set

    monkeypatch.setattr(task_module, "image_datasets", image_datasets)
    for given, crop in ((None, 48), (40, 40)):
        seen.clear()
        run = tmp_path / f"crop{given}"
        result = train_within_budget(tiny_config(imagefolder, budget=0.2, run_dir=str(run), train_input_size=given))
        plan = json.loads((result.run_dir / "recipe.json").read_text())
        assert plan["decision"]["kind"] == "whole" and plan["decision"]["train_input_size"] == crop
        assert plan["decision"]["load_ms"] > 0  # the loader's time, measured on the run's training images
        assert seen == [((crop, crop), (64, 64))]
        tuned = Checkpoint.load(run / "finetune" / "last.pt")
        assert tuned.train_config().model.train_input_size == crop and tuned.preprocess.input_size == 64


def test_the_loaders_time_is_measured_on_the_images_that_decode(tmp_path):
    """A broken file among the first images is left to the run (refused, or skipped with --skip-bad), not a crash of
    the plan; the time per image is that of the ones decoded."""
    Image.new("RGB", (300, 200), (10, 200, 30)).save(tmp_path / "ok.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    samples = [Sample(tmp_path / name, 0, "train") for name in ("broken.jpg", "ok.jpg", "ok.jpg")]
    assert recipe.loading_seconds(TrainConfig(), Preprocess(input_size=64), samples) > 0
    assert recipe.loading_seconds(TrainConfig(), Preprocess(input_size=64), samples[:1]) == 0


@pytest.mark.parametrize("frozen", [True, False])
def test_the_fine_tuning_stage_keeps_the_users_batchnorm_choice(tmp_path, frozen):
    """``--budget 30 --no-freeze-bn-stats`` fine-tunes with batch statistics (the stage once forced them frozen and
    dropped the flag without a word); the default stays frozen."""
    head = SimpleNamespace(path=tmp_path / "head.pt", preprocess=Preprocess(input_size=64))
    cfg = TrainConfig().replace(freeze_bn_stats=frozen, budget=30.0)
    stage = recipe.finetune_config(cfg, head, epochs=5, run_dir=tmp_path / "finetune")
    assert stage.model.freeze_bn_stats is frozen and not stage.model.freeze_backbone and stage.recipe.budget is None
