"""--low-res-share: the first share of whole-network fine-tuning's epochs on downsized crops, then full size, planned
at each epoch's cost so a budget still ends at its limit."""

from __future__ import annotations

import pytest

import finegrain.engine.train as train_module
from finegrain.engine.addons.low_res import LowResAddOn, low_res_side
from finegrain.engine.replan import OVERSHOOT, replan_epochs
from finegrain.engine.train import fit

from .conftest import make_imagefolder


def test_replan_counts_the_full_size_epochs_still_to_come():
    """After one half-cost epoch of 5 s (10 s at full size) with 115 s left, and half of any plan at half cost:
    16 epochs fit (7.5 full-size epochs' worth after the first); the first epoch's speed alone would plan 24."""
    half = lambda e, n: 0.5 if e < round(0.5 * n) else 1.0  # noqa: E731
    planned = replan_epochs(120, 5, 10, 1, half)
    assert planned == 16
    assert 5 + 10 * sum(half(e, planned) for e in range(1, planned)) <= 120
    assert replan_epochs(120, 5, 5, 1) == 24  # (every epoch as fast as the first)


@pytest.mark.parametrize("crop, side", [(176, 128), (224, 160), (96, 64), (32, 32)])
def test_low_res_side_is_about_half_the_area_in_16_px(crop, side):
    assert low_res_side(crop) == side


def test_first_share_of_epochs_train_on_small_crops_and_the_budget_ends_at_its_limit(tmp_path, tiny_config,
                                                                                     monkeypatch):  # fmt: skip
    """A fake clock: a full-size epoch takes 10 s, a low-resolution one its area's share. The plan made after the
    first epoch is the one run (the cost model knows the full-size epochs are slower), the run ends within
    ``OVERSHOOT`` of its 120 s with less than an epoch unused, and the batches really were smaller."""
    data = make_imagefolder(tmp_path / "data", num_classes=3, per_class=6)
    now, seen = [0.0], []
    switch_at = lambda low: 10**9 if low.full_from is None else low.full_from  # noqa: E731
    real_epoch, real_batch = train_module.train_one_epoch, LowResAddOn.batch

    def epoch(ctx, *args, **kwargs):
        row = real_epoch(ctx, *args, **kwargs)
        low = next(a for a in ctx.addons if a.name == "low_res")
        now[0] += 10 * ((low.side / low.crop) ** 2 if low.epoch < switch_at(low) else 1)
        return row

    def batch(self, x, images):
        out = real_batch(self, x, images)
        seen.append((self.epoch, out.shape[-1]))
        return out

    monkeypatch.setattr(train_module, "clock", lambda: now[0])
    monkeypatch.setattr(train_module, "train_one_epoch", epoch)
    monkeypatch.setattr(LowResAddOn, "batch", batch)
    cfg = tiny_config(data, pretrained=False, freeze_backbone=False, epochs=3, time_limit=2, replan_epochs=True,
                      low_res_share=0.5)  # fmt: skip
    history = fit(cfg).history
    side = low_res_side(64)
    crops = [r["train_crop"] for r in history]
    switch = crops.index(64)
    assert set(crops[:switch]) == {side} and set(crops[switch:]) == {64}
    assert switch == round(0.5 * len(history))
    assert history[0]["planned_epochs"] == len(history)
    assert abs(now[0] - 120) <= OVERSHOOT * 120 and 120 - now[0] < 10
    assert {e: s for e, s in seen} == {e: side if e < switch else 64 for e in range(len(history))}
