"""--keep-epoch: which epoch becomes best.pt. ``best`` keeps the highest validation score, ``last`` the schedule's
end, ``auto`` (the default recipe's) the end unless an earlier epoch answers the validation images better beyond their
noise; a resumed run decides from the answers its last.pt kept."""

import pytest
import torch

import finegrain.engine.train as train_module
from finegrain.checkpoint import Checkpoint
from finegrain.engine import recipe
from finegrain.engine.epochs import earlier_is_better
from finegrain.engine.train import fit
from finegrain.run_layout import RunDir
from tests.conftest import fit_killed_in_epoch


def test_earlier_is_better_counts_only_the_images_answered_differently():
    right, wrong = [True] * 6, [False] * 6
    assert earlier_is_better(right, wrong) == (True, {"earlier_only": 6, "end_only": 0, "z": 2.45})
    assert earlier_is_better(right[:4] + wrong[:2], wrong) == (False, {"earlier_only": 4, "end_only": 0, "z": 2.0})
    assert earlier_is_better(right, right)[0] is False  # agreeing everywhere: no evidence either way
    assert earlier_is_better([True, False] * 20, [False, True] * 20)[0] is False  # as many the other way
    with pytest.raises(ValueError):
        earlier_is_better(right, wrong[:5])


def scored_epochs(monkeypatch, first_answers_better: bool) -> list[int]:
    """Validation as if epoch 1 scored highest; its answers all right and the later epochs' all wrong where
    ``first_answers_better``, else every epoch's answers the same."""
    real, calls = train_module.evaluate, []

    def evaluate(*args, **kwargs):
        m = real(*args, **kwargs)
        first = not calls
        calls.append(1)
        m["top1"] = 0.9 if first else 0.5
        if kwargs.get("keep_predictions"):
            n = max(m["labels"]) + 1
            right = first or not first_answers_better
            m["predicted"] = [y if right else (y + 1) % n for y in m["labels"]]
        return m

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    return calls


@pytest.mark.parametrize(("rule", "first_answers_better", "kept_epoch"), [
    ("best", False, 0), ("last", False, 2), ("auto", False, 2), ("auto", True, 0),
])  # fmt: skip
def test_keep_epoch_chooses_best_pt(rule, first_answers_better, kept_epoch, cub, tiny_config, monkeypatch):
    scored_epochs(monkeypatch, first_answers_better)
    run = fit(tiny_config(cub, keep_epoch=rule, val_fraction=0.5)).run_dir  # 20 validation images
    best, last = Checkpoint.load(run / RunDir.BEST), Checkpoint.load(run / RunDir.LAST)
    assert best.epoch == kept_epoch and last.epoch == 2
    assert best.resume is None
    same = all(torch.equal(a, b) for a, b in zip(best.state_dict.values(), last.state_dict.values(), strict=True))
    assert same is (kept_epoch == 2)


def test_a_resumed_run_decides_from_the_answers_last_pt_kept(cub, tiny_config, monkeypatch):
    scored_epochs(monkeypatch, first_answers_better=False)
    cfg = tiny_config(cub, keep_epoch="auto")
    fit_killed_in_epoch(monkeypatch, 2, cfg)  # epochs 1 and 2 saved; epoch 1's answers only in last.pt
    fit(resume=cfg.run.run_dir)  # without them, auto could not weigh epoch 1 against the end and would keep it
    assert Checkpoint.load(f"{cfg.run.run_dir}/{RunDir.BEST}").epoch == 2


@pytest.mark.parametrize(("given", "expected"), [((), "auto"), (("keep_epoch",), "best")])
def test_the_budgeted_recipe_keeps_the_end_unless_the_user_said(given, expected, tiny_config, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(recipe, "train_within_budget", lambda cfg, started=None: seen.append(cfg))
    recipe.train(tiny_config(tmp_path, budget=None), given)
    assert seen and seen[0].optim.keep_epoch == expected
