"""--replan-epochs (set by --budget): the plan follows the speed the run actually has, on a clock the test controls."""

import pytest

import finegrain.engine.train as train_module
from finegrain.engine.addons.mirror_check import MirrorCheckAddOn
from finegrain.engine.replan import OVERSHOOT, replan_epochs
from finegrain.engine.train import fit


@pytest.mark.parametrize(
    "elapsed, epoch_s, done, expected",
    [
        (10, 10, 1, 12),  # 110 s left of 120: eleven more
        (44, 20, 4, 8),  # 3.8 epochs fit: stopping would leave 16 s (over 10% of 120), the fourth ends 4 s late
        (14, 10, 1, 11),  # 10.6 fit: stop 6 s early (within 10%) rather than end 4 s late, though that is closer
        (100, 40, 2, 2),  # 0.5 fit: one more would end 20 s late (over 10% of 120), so stop 20 s early
        (130, 10, 5, 5),  # past the limit: never fewer than done
        (1, 0.01, 1, 300),  # a tiny dataset's 0.01 s epochs: at most MAX_EPOCHS, not 11,900
    ],
)
def test_replan_ends_inside_the_limit_where_it_can(elapsed, epoch_s, done, expected):
    assert replan_epochs(120, elapsed, epoch_s, done) == expected


class SlowingMachine:
    """A wall clock that moves only when an epoch runs, by the seconds that epoch is given."""

    def __init__(self, durations) -> None:
        self.now, self.durations, self.epochs = 0.0, list(durations), 0

    def __call__(self) -> float:
        return self.now

    def run_epoch(self, real_epoch):
        def epoch(*args, **kwargs):
            row = real_epoch(*args, **kwargs)
            self.now += self.durations[min(self.epochs, len(self.durations) - 1)]
            self.epochs += 1
            return row

        return epoch


@pytest.mark.parametrize(
    "first_plan, durations",
    [
        (6, [8, 8, 8, 20]),  # the machine slows 2.5x from epoch 4 on (another job starts)
        (4, [10]),  # the probe was taken on a busy machine: epochs are 3x faster than planned
    ],
)
def test_budget_ends_near_its_limit_when_the_speed_changes(imagefolder, tiny_config, monkeypatch, first_plan,
                                                          durations):  # fmt: skip
    machine = SlowingMachine(durations)
    monkeypatch.setattr(train_module, "clock", machine)
    monkeypatch.setattr(train_module, "train_one_epoch", machine.run_epoch(train_module.train_one_epoch))
    limit_s = 120
    result = fit(tiny_config(imagefolder, epochs=first_plan, time_limit=limit_s / 60, replan_epochs=True))
    last_epoch = durations[min(len(result.history), len(durations)) - 1]
    assert abs(machine.now - limit_s) <= OVERSHOOT * limit_s, [r["planned_epochs"] for r in result.history]
    assert limit_s - machine.now < last_epoch  # never a whole epoch's time left unused
    assert len(result.history) == result.history[-1]["planned_epochs"] != first_plan
    lrs, floor = [r["lr"] for r in result.history], tiny_config(imagefolder).optim.min_lr
    assert lrs[-1] == pytest.approx(floor, abs=1e-7) and lrs[-2] > 10 * floor  # annealed at the end, not before


def test_an_add_ons_one_off_work_is_not_taken_for_a_slower_epoch(imagefolder, tiny_config, monkeypatch):
    """The mirror check (15 s once, before epoch 2) counts in the elapsed time but not as an epoch's time: 10-s epochs
    in 60 s after it fit 4, and no plan after it asks for fewer (counted as an epoch's, the plan fell to 3, then rose
    back to 4, moving the cosine lr back and forth)."""
    machine = SlowingMachine([10])
    monkeypatch.setattr(train_module, "clock", machine)
    monkeypatch.setattr(train_module, "train_one_epoch", machine.run_epoch(train_module.train_one_epoch))
    decide = MirrorCheckAddOn._decide

    def slow_decide(self):
        machine.now += 15
        decide(self)

    monkeypatch.setattr(MirrorCheckAddOn, "_decide", slow_decide)
    cfg = tiny_config(imagefolder, freeze_backbone=False, mirror_check=True, epochs=4, time_limit=1.0,
                      replan_epochs=True, warmup_epochs=0)  # fmt: skip
    history = fit(cfg).history
    plans = [r["planned_epochs"] for r in history]
    assert len(history) == 4 and machine.now == 55, plans
    assert min(plans[1:]) == 4, plans


def test_without_replanning_the_first_plan_stands(imagefolder, tiny_config, monkeypatch):
    machine = SlowingMachine([10])
    monkeypatch.setattr(train_module, "clock", machine)
    monkeypatch.setattr(train_module, "train_one_epoch", machine.run_epoch(train_module.train_one_epoch))
    result = fit(tiny_config(imagefolder, epochs=4, time_limit=2.0))
    assert len(result.history) == 4 and machine.now == 40  # two thirds of the limit unused: what re-planning fixes


def test_resume_extends_with_epochs_and_a_replanned_run_keeps_its_plan(imagefolder, tiny_config, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    run = fit(tiny_config(imagefolder, epochs=1, run_dir=str(tmp_path / "a"))).run_dir
    again = fit(tiny_config(imagefolder, epochs=3, run_dir=str(run)), resume=run)  # --resume RUN --epochs 3
    assert [r["epoch"] for r in again.history] == [2, 3]
    machine = SlowingMachine([10])
    monkeypatch.setattr(train_module, "clock", machine)
    monkeypatch.setattr(train_module, "train_one_epoch", machine.run_epoch(train_module.train_one_epoch))
    cfg = tiny_config(imagefolder, epochs=2, time_limit=0.5, replan_epochs=True, run_dir=str(tmp_path / "b"))
    planned = fit(cfg).history[-1]["planned_epochs"]  # 30 s of 10-s epochs: 3
    assert planned == 3
    assert fit(cfg, resume=tmp_path / "b").history == []  # its plan is done: nothing left to run
