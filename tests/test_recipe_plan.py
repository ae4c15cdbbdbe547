"""The budgeted recipe's choice of fine-tuning, from timings (mocked: the machine's speed is the input)."""

from __future__ import annotations

import json

import pytest

import finegrain.engine.recipe as recipe
from finegrain.checkpoint import Checkpoint
from finegrain.engine.recipe import PARTIAL_STAGES, WHOLE_MIN_EPOCHS, plan_finetuning, train_within_budget


@pytest.mark.parametrize(
    ("left_s", "whole_img_s", "stages_img_s", "cache_s", "kind", "epochs"),
    [
        (600, 10, 100, 10, "whole", 6),  # 100 s whole epochs: 6 fit, enough
        (600, 5, 100, 60, "stages", 54),  # 200 s whole epochs: 3 fit, too few; 10 s epochs on maps after the cache
        (600, 2, 100, 600, "whole", 1),  # the cache alone takes all the time: one whole epoch still fits
        (600, 1, 100, 600, "none", 0),  # nothing fits
        (600, 1, 1e-9, float("inf"), "none", 0),  # partial fine-tuning not possible (add-ons), no whole epoch fits
    ],
)
def test_plan_from_measured_speeds(left_s, whole_img_s, stages_img_s, cache_s, kind, epochs):
    assert WHOLE_MIN_EPOCHS == 4  # the cases above are written for it
    plan = plan_finetuning(left_s, n_train=1000, n_val=0, whole_img_s=whole_img_s, stages_img_s=stages_img_s,
                           cache_s=cache_s)  # fmt: skip
    assert (plan["kind"], plan["finetune_epochs"]) == (kind, epochs)
    assert plan["train_stages"] == (PARTIAL_STAGES if kind == "stages" else 0)


def test_budget_fine_tunes_the_last_stages_on_maps_on_a_slow_machine(imagefolder, tiny_config, tmp_path, monkeypatch):
    """Whole-network fine-tuning measured too slow for WHOLE_MIN_EPOCHS, partial fine-tuning fast: the recipe trains
    the last stages on cached maps, says so in recipe.json, and keeps the stage that validates better."""
    speeds = {0: 0.1, PARTIAL_STAGES: 1e6}  # img/s by train_stages: one whole epoch takes minutes
    monkeypatch.setattr(recipe, "finetune_speed", lambda *a, train_stages=0, **k: speeds[train_stages])
    monkeypatch.setattr(recipe, "cache_speed", lambda *a, **k: 1e6)
    cfg = tiny_config(imagefolder, head="auto", budget=0.6, run_dir=str(tmp_path / "b"), map_views=2)
    result = train_within_budget(cfg)
    plan = json.loads((result.run_dir / "recipe.json").read_text())
    assert plan["decision"]["kind"] == "stages" and plan["decision"]["whole_epochs_fit"] == 0
    assert plan["stages"]["finetune"]["kind"] == "stages" and plan["stages"]["finetune"]["epochs"] >= 1
    tuned = Checkpoint.load(tmp_path / "b" / "finetune" / "last.pt")
    assert tuned.train_config().model.train_stages == PARTIAL_STAGES
    kept = plan["stages"][plan["kept"]]
    assert kept["val_top1"] == max(s["val_top1"] for s in plan["stages"].values())
