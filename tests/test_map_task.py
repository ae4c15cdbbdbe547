"""Partial fine-tuning on cached maps (``--no-freeze-backbone --train-stages N``, engine/map_task.py)."""

from __future__ import annotations

import json

import pytest
import torch

from finegrain.checkpoint import Checkpoint
from finegrain.data.loading import open_image
from finegrain.data.transforms import eval_transform
from finegrain.engine import map_task
from finegrain.engine import train as train_module
from finegrain.engine.map_task import CachedMaps, MapTask
from finegrain.engine.train import fit
from finegrain.errors import ConfigError
from finegrain.models import create_model

from .conftest import fit_killed_in_epoch

#: fp32 throughout: the cut changes no operation, only where the computation pauses, so the logits agree to rounding
TOLERANCE = 1e-4


def partial(tiny_config, data, run, **overrides):
    base = dict(freeze_backbone=False, train_stages=2, map_views=2, epochs=3, lr=3e-3, run_dir=str(run))
    return tiny_config(data, **{**base, **overrides})


def test_cut_model_gives_the_whole_models_logits():
    model = create_model("baseline", num_classes=5).eval()
    x = torch.randn(3, 3, 96, 96)
    for stages in (1, 2, 7):
        lower, upper = model.split_stages(stages)
        with torch.no_grad():
            torch.testing.assert_close(upper(lower(x)), model(x), atol=TOLERANCE, rtol=0)
        assert not any(p.requires_grad for p in lower.parameters())
        trained = {id(p) for p in upper.parameters()}
        assert {id(p) for p in model.head.parameters()} <= trained
        assert {id(p) for p in model.backbone.blocks[-stages:].parameters()} <= trained


def test_cached_validation_maps_give_the_uncached_logits_and_training_learns(cub, tiny_config, tmp_path, monkeypatch):
    seen = {}
    real_epoch = train_module.train_one_epoch

    def spy(ctx, task, *args, **kwargs):
        if not seen:  # before the first step: the cached maps against the model on the images themselves
            model = ctx.model.eval()
            images = [eval_transform(model.preprocess)(open_image(s.path)) for s in ctx.index.split("val")]
            with torch.no_grad():
                maps = torch.stack([task.val_set[i][0] for i in range(len(images))])
                seen["cached"] = task.trainable(maps.to(ctx.device)).cpu()
                seen["images"] = model(torch.stack(images).to(ctx.device)).cpu()
            seen["task"] = task
        return real_epoch(ctx, task, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", spy)
    result = fit(partial(tiny_config, cub, tmp_path / "run", epochs=6))
    assert isinstance(seen["task"], MapTask) and isinstance(seen["task"].train_set, CachedMaps)
    assert seen["task"].train_set.maps.shape[0] == 2  # --map-views 2
    torch.testing.assert_close(seen["cached"], seen["images"], atol=TOLERANCE, rtol=0)
    assert result.history[-1]["train_acc"] > 0.6  # 4 learnable classes: chance is 0.25

    before = create_model("baseline", num_classes=4)  # the lower stages never move; the upper ones do
    after = Checkpoint.load(tmp_path / "run" / "last.pt").build_model()
    for (name, a), b in zip(before.backbone.state_dict().items(), after.backbone.state_dict().values(), strict=True):
        if name.startswith(("conv_stem", "bn1", "blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.", "blocks.4.")):
            assert torch.equal(a, b), f"{name} of a frozen stage changed"
    assert not torch.equal(before.backbone.blocks[6][0].conv_pw.weight, after.backbone.blocks[6][0].conv_pw.weight)


def test_partial_finetuning_resumes_exactly(cub, tiny_config, tmp_path, monkeypatch):
    straight = fit(partial(tiny_config, cub, tmp_path / "a"))
    fit_killed_in_epoch(monkeypatch, 2, partial(tiny_config, cub, tmp_path / "b"))  # reuses the first run's maps
    map_task._LAST.clear()  # the resumed run builds its maps again: the same ones, from the run's seed
    resumed = fit(None, resume=tmp_path / "b")
    assert [r["epoch"] for r in resumed.history] == [3]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] == straight.history[-1]["train_loss"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"freeze_backbone": True}, "--no-freeze-backbone"),
        ({"train_stages": 9}, "1 to 7"),
        ({"method": "bcnn"}, "--method baseline"),
        ({"train_input_size": 48}, "train-input-size crops whole images"),
    ],
)
def test_refusals_name_the_fix(cub, tiny_config, tmp_path, overrides, named):
    with pytest.raises(ConfigError, match=named):
        fit(partial(tiny_config, cub, tmp_path / "run", **overrides))


def test_cache_takes_fewer_views_where_more_would_not_fit_and_refuses_where_none_does(cub, tiny_config, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    seen = []
    real_epoch = train_module.train_one_epoch
    monkeypatch.setattr(train_module, "train_one_epoch", lambda ctx, task, *a, **k: seen.append(task) or real_epoch(
        ctx, task, *a, **k))  # fmt: skip
    per_image = 112 * 4 * 4 * 4  # lite0 at 64 px, cut before its last 2 stages: 112 x 4 x 4 fp32 values
    monkeypatch.setattr(map_task, "MAX_CACHE_BYTES", 2.5 * 20 * per_image)  # 20 images: 2 views and a half
    fit(partial(tiny_config, cub, tmp_path / "a", map_views=4, epochs=1))
    assert seen[0].train_set.maps.shape[0] == 2
    monkeypatch.setattr(map_task, "MAX_CACHE_BYTES", 10 * per_image)
    map_task._LAST.clear()
    with pytest.raises(ConfigError, match="GiB a view"):
        fit(partial(tiny_config, cub, tmp_path / "b", map_views=4, epochs=1))
