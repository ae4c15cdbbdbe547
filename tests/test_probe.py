"""The probe: scikit-learn's logistic regression as a linear layer, its penalty chosen on validation, as the
default head on cached features."""

import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from finegrain.checkpoint import Checkpoint
from finegrain.cli import main
from finegrain.engine.probe import fit_probe, folds_c, l2_normalise, logistic_regression
from finegrain.engine.recipe import finetune_speed, train_within_budget
from finegrain.engine.setup import model_from_config
from finegrain.engine.train import fit
from finegrain.errors import ConfigError
from finegrain.export import export_onnx

from .conftest import write_images


def separable(n: int = 240, d: int = 12, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around k random directions: linearly separable after normalisation, with noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 3
    y = torch.arange(n) % k
    return centres[y] + torch.randn(n, d, generator=g), y


def regularised_loss(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """The multinomial logistic regression objective: ||W||^2 / 2 + C * summed cross-entropy (bias unpenalised)."""
    return 0.5 * (w**2).sum() + c * torch.nn.functional.cross_entropy(x @ w.T + b, y, reduction="sum")


def minimise(x: torch.Tensor, y: torch.Tensor, k: int, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same objective minimised independently: torch's L-BFGS in float64 to a tight tolerance."""
    w = torch.zeros(k, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = regularised_loss(x, y, w, b, c)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


@pytest.mark.parametrize("c", [0.1, 1.0, 10.0])
def test_logistic_regression_minimises_the_regularised_loss(c):
    """The probe's linear layer is the minimiser of the L2-regularised multinomial loss, checked against an
    independent solver (not against the scikit-learn call it wraps): its loss is within 0.1% of the minimum (on
    this problem a zero bias costs 0.7-2%) and its probabilities within 0.01."""
    x, y = separable()
    x = l2_normalise(x)
    w, b = logistic_regression(x, y, 3, c)
    xd = x.double()
    ref_w, ref_b = minimise(xd, y, 3, c)
    ours, best = regularised_loss(xd, y, w.double(), b.double(), c), regularised_loss(xd, y, ref_w, ref_b, c)
    assert (ours - best) / best < 1e-3
    ours_p, ref_p = (xd @ w.double().T + b.double()).softmax(1), (xd @ ref_w.T + ref_b).softmax(1)
    assert (ours_p - ref_p).abs().max() < 0.01 and torch.equal(ours_p.argmax(1), ref_p.argmax(1))


def test_absent_classes_are_never_predicted_and_two_classes_match_the_binary_model():
    x, y = separable()
    x = l2_normalise(x)
    two = y != 2
    w, b = logistic_regression(x[two], y[two], 3, 1.0)
    assert w.shape == (3, x.shape[1]) and not ((x @ w.T + b).argmax(1) == 2).any()
    ref = LogisticRegression(C=1.0).fit(x[two].numpy(), y[two].numpy())
    probs = (x @ w.T + b)[:, :2].softmax(1)[:, 1].numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(x.numpy())[:, 1], atol=1e-5)
    w, b = logistic_regression(x[y == 1], y[y == 1], 3, 1.0)
    assert ((x @ w.T + b).argmax(1) == 1).all()


def test_penalty_is_chosen_on_validation():
    x, y = separable(n=480, seed=1)
    result = fit_probe(x[::2], y[::2], x[1::2], y[1::2], 3, grid=(0.01, 1.0, 100.0))
    assert [r["C"] for r in result["sweep"]] == [0.01, 1.0, 100.0]
    best = max(r["val_top1"] for r in result["sweep"])
    assert result["val_top1"] == best > 0.9
    assert result["C"] == min(r["C"] for r in result["sweep"] if r["val_top1"] == best)


def test_folds_choose_the_penalty_a_one_class_validation_split_cannot_see():
    # half of the rows are class 0: the strongest penalty answers "class 0" for every row, which a validation split
    # of class-0 images scores as perfect (a 20-image split of a 30%-labels run sees no more); folds of every class
    # see it fail on the other half
    x, y = separable(n=900, seed=2)
    rows = torch.cat([torch.nonzero(y == 0).flatten()[:150], torch.nonzero(y != 0).flatten()[:150]])
    rows = rows[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    x, y = l2_normalise(x[rows]), y[rows]
    grid, even, odd = (1e-4, 10.0), torch.arange(0, 300, 2), torch.arange(1, 300, 2)
    val = odd[y[odd] == 0][:20]
    assert fit_probe(x[even], y[even], x[val], y[val], 3, grid=grid)["C"] == 1e-4
    assert folds_c(x, y, [(even, odd), (odd, even)], 3, grid=grid) == 10.0
    assert folds_c(x, y, [(even, odd), (odd, even)], 3, grid=(10.0, 30.0)) == 10.0  # a tie: the smaller


def test_probe_head_is_solved_saved_exported_and_resumes_as_done(imagefolder, tiny_config, tmp_path):
    result = fit(tiny_config(imagefolder, head="probe"))
    (row,) = result.history
    assert row["val_top1"] >= 0.75  # 4 classes: chance is 0.25
    probe = json.loads((result.run_dir / "probe.json").read_text())
    assert [v["crop_pct"] for v in probe["views"]] == [1.0, 0.875]  # the run's view, then the other
    chosen = next(v for v in probe["views"] if v["crop_pct"] == probe["crop_pct_chosen"])
    assert probe["C_chosen"] in [r["C"] for r in chosen["C_tried"]]
    assert Checkpoint.load(result.run_dir / "best.pt").preprocess.crop_pct == probe["crop_pct_chosen"]
    ckpt = Checkpoint.load(result.run_dir / "best.pt")
    assert ckpt.model_kwargs["feature_norm"] is True and ckpt.build_model().head.l2
    assert export_onnx(result.run_dir / "best.pt", tmp_path / "m.onnx")["max_abs_diff"] < 1e-3
    again = fit(None, resume=result.run_dir)  # nothing left to do: the same model back
    assert again.history == []
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(again.model.cpu().eval()(x), result.model.cpu().eval()(x))  # layouts differ


def test_sgd_head_still_trains_for_epochs(imagefolder, tiny_config):
    result = fit(tiny_config(imagefolder, head="sgd", epochs=2))
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_auto_head_keeps_the_better_on_validation(imagefolder, tiny_config):
    result = fit(tiny_config(imagefolder, head="auto", epochs=2))
    assert [r["epoch"] for r in result.history] == [1, 2]
    recipe = json.loads((result.run_dir / "recipe.json").read_text())
    assert set(recipe["candidates"]) == {"probe", "sgd"} and recipe["chosen"] in ("probe", "sgd")
    probe, sgd = recipe["candidates"]["probe"]["val_top1"], recipe["candidates"]["sgd"]["val_top1"]
    assert recipe["chosen"] == ("probe" if probe > sgd else "sgd")
    best = Checkpoint.load(result.run_dir / "best.pt")
    assert best.model_kwargs.get("feature_norm", False) == (recipe["chosen"] == "probe")
    assert result.model.head.l2 == (recipe["chosen"] == "probe")


@pytest.mark.slow
def test_budget_is_honoured_and_the_recipe_names_its_decision(imagefolder, tiny_config, tmp_path):
    """A tiny budget: the head first, fine-tuning only for the epochs the rest allows (a distilling teacher's pass
    counted); the run ends in time, and RUN_DIR holds the stage with the better validation top-1, with what its
    add-ons wrote (unlabeled.json)."""
    unl = tmp_path / "unlabelled"
    for c in range(4):
        write_images(unl, c, 2, np.random.default_rng(c), start=50 + 10 * c)
    teacher = fit(tiny_config(imagefolder, epochs=1, run_dir=str(tmp_path / "teacher"))).run_dir / "best.pt"
    cfg = tiny_config(imagefolder, head="auto", budget=0.5, run_dir=str(tmp_path / "budget"), unlabeled=str(unl),
                      pseudo_fraction=1.0, teachers=[str(teacher)], kd_targets="online")  # fmt: skip
    start = time.perf_counter()
    result = train_within_budget(cfg)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5 * 60 + 20  # the budget, plus the final evaluation of the last epoch at most
    recipe = json.loads((result.run_dir / "recipe.json").read_text())
    assert recipe["kept"] in recipe["stages"] and recipe["why"]
    kept = recipe["stages"][recipe["kept"]]
    assert kept["val_top1"] == max(s["val_top1"] for s in recipe["stages"].values())
    best = Checkpoint.load(result.run_dir / "best.pt")
    assert best.metrics["val_top1"] == kept["val_top1"]
    assert (result.run_dir / "split.csv").is_file() and best.dataset().classes == best.classes
    unlabeled = json.loads((result.run_dir / "unlabeled.json").read_text())
    assert len(unlabeled["pseudo_labelled"]) == unlabeled["kept"] > 0
    assert recipe["unlabeled"] == {"fraction": 1.0, "pseudo_labelled": unlabeled["kept"], "why": unlabeled["why"]}
    own = best.dataset().count("train")  # the epochs were planned for the images trained on, pseudo-labels included
    assert recipe["decision"]["train_images"] == own + unlabeled["kept"]
    assert recipe["decision"]["teachers_per_batch"] == 1  # --kd-targets online: timed with the teacher's pass
    if "finetune" in recipe["stages"]:  # it ran the plan it ended with: the recipe's, or the last re-plan on record
        ft = recipe["stages"]["finetune"]
        assert ft["epochs"] == (
            ft["replans"][-1]["planned_epochs"] if ft["replans"] else recipe["decision"]["finetune_epochs"]
        )


def test_the_budget_counts_from_when_the_command_started(imagefolder, tiny_config, tmp_path, monkeypatch):
    """A run whose process started 40 s before a 0.5-minute budget has no time left to fine-tune, even where an
    epoch would take no time at all."""
    import finegrain.engine.recipe as recipe_module

    monkeypatch.setattr(recipe_module, "finetune_speed", lambda *a, **k: 1e6)
    cfg = tiny_config(imagefolder, head="auto", budget=0.5, run_dir=str(tmp_path / "late"))
    result = train_within_budget(cfg, started=time.perf_counter() - 40)
    recipe = json.loads((result.run_dir / "recipe.json").read_text())
    assert set(recipe["stages"]) == {"head"} and recipe["decision"]["seconds_left"] < 0
    assert recipe["total_s"] >= 40


@pytest.mark.parametrize(
    "above_head, head_only, kept",
    [(0.5, 0, "finetune"), (0.0, 0, "finetune"), (-0.5, 2, "finetune"), (-0.5, 6, "head")],
)
def test_budget_keeps_the_stage_that_validates_better(imagefolder, tiny_config, tmp_path, monkeypatch, above_head,
                                                      head_only, kept):  # fmt: skip
    """The fine-tuned stage's validation score is set above, equal to and below the head's, and where the head leads
    it answers ``head_only`` validation images the fine-tuned network misses (and nothing the other way):
    RUN_DIR/best.pt must be the kept stage's own checkpoint, the fine-tuned one unless the head leads beyond noise (z
    1.41 for two images: noise; 2.45 for six; engine/keep_stage.py). On the rule before, a higher head score kept
    the head."""
    import finegrain.engine.recipe as recipe_module

    real_fit, real_right = recipe_module.fit, recipe_module.validation_right

    def fit_scored(cfg, *args, **kwargs):  # the fine-tuning stage runs one epoch, its kept checkpoint the score
        if cfg.model.freeze_backbone:
            return real_fit(cfg, *args, **kwargs)
        finetune_val = Checkpoint.load(cfg.model.init_from).metrics["val_top1"] + above_head  # from the head's
        result = real_fit(cfg.replace(epochs=1, time_limit=None, replan_epochs=False), *args, **kwargs)
        kept = Checkpoint.load(result.run_dir / "best.pt")
        kept.metrics = {**kept.metrics, "val_top1": finetune_val}
        kept.save(result.run_dir / "best.pt")
        return dataclasses.replace(result, history=[{**r, "val_top1": finetune_val} for r in result.history])

    asked = []

    def right(run_dir, workers):  # the real answers' length, then the answers the case needs
        real = real_right(run_dir, workers)
        asked.append(Path(run_dir).name)
        return [True] * len(real) if asked[-1] == "head" else [i >= head_only for i in range(len(real))]

    monkeypatch.setattr(recipe_module, "fit", fit_scored)
    monkeypatch.setattr(recipe_module, "validation_right", right)
    monkeypatch.setattr(recipe_module, "finetune_speed", lambda *a, **k: 1e6)  # plan fine-tuning
    result = train_within_budget(tiny_config(imagefolder, head="auto", budget=5, run_dir=str(tmp_path / "b")))
    recipe = json.loads((result.run_dir / "recipe.json").read_text())
    assert set(recipe["stages"]) == {"head", "finetune"} and recipe["kept"] == kept
    assert sorted(asked) == (["finetune", "head"] if above_head < 0 else [])  # answers only where the head leads
    stage_best = Path(recipe["stages"][kept]["run_dir"]) / "best.pt"
    assert (result.run_dir / "best.pt").read_bytes() == stage_best.read_bytes()


def test_fine_tuning_from_a_probe_starts_where_the_probe_ends(imagefolder, tiny_config):
    probe = fit(tiny_config(imagefolder, head="probe")).run_dir / "best.pt"
    cfg = tiny_config(imagefolder, init_from=str(probe), freeze_backbone=False, crop_pct=1.0)
    started = model_from_config(cfg, Checkpoint.load(probe).classes).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(started(x), Checkpoint.load(probe).build_model()(x))


def test_fine_tuning_speed_counts_the_distillation_teachers_pass(imagefolder, tiny_config):
    """Distilling, the teachers run on every fine-tuning batch: the estimate the budget plans epochs with must pay
    for them."""

    class SlowTeacher(torch.nn.Module):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            SlowTeacher.calls += 1
            time.sleep(0.2)
            return x.mean()

    cfg = tiny_config(imagefolder)
    model = model_from_config(cfg, ["a", "b", "c"])
    alone = finetune_speed(model, 3, cfg, torch.device("cpu"))
    taught = finetune_speed(model, 3, cfg, torch.device("cpu"), teachers=[SlowTeacher()])
    assert SlowTeacher.calls == 4  # the warm-up step and three timed ones
    assert taught < alone and taught <= cfg.optim.batch_size / 0.2  # every timed step waited for the teacher


def test_fit_refuses_a_budget_it_would_ignore(imagefolder, tiny_config):
    with pytest.raises(ConfigError, match="train_within_budget"):
        fit(tiny_config(imagefolder, budget=1.0))


@pytest.mark.parametrize(
    "argv, yaml, expected",
    [
        ([], None, "recipe 10"),  # nothing given: the default budget
        (["--budget", "3"], None, "recipe 3"),
        (["--budget", "0"], None, "fit"),  # the head alone, one flag away
        (["--epochs", "4"], None, "fit"),  # a schedule by hand runs as given
        (["--no-freeze-backbone"], None, "fit"),
        (["--method", "bcnn"], None, "fit"),
        (["--val-fraction", "0"], None, "fit"),  # nothing to choose on
        ([], "lr: 0.01\n", "fit"),  # by hand in --config too
        ([], "optim:\n  epochs: 2\n", "fit"),  # grouped YAML
        ([], "seed: 3\n", "recipe 10"),  # options that are not a schedule keep the default
        (["--epochs", "4", "--budget", "2"], None, "recipe 2"),  # an explicit budget wins
    ],
)
def test_finegrain_train_spends_the_default_budget_unless_a_schedule_is_given(imagefolder, tmp_path, monkeypatch,
                                                                             argv, yaml, expected):  # fmt: skip
    """Which path `finegrain train` takes, the two trainings replaced by recorders (no training runs)."""
    import finegrain.engine.recipe as recipe

    taken, done, called = [], SimpleNamespace(run_dir=tmp_path / "run"), time.perf_counter()

    def record(cfg, started=None):  # the budget counts from the process's start, before this test called main
        assert started is not None and started < called - 1.0
        return taken.append(f"recipe {cfg.recipe.budget:g}") or done

    monkeypatch.setattr(recipe, "train_within_budget", record)
    monkeypatch.setattr(recipe, "fit", lambda cfg: taken.append("fit" if cfg.recipe.budget is None else "?") or done)
    if yaml:
        (tmp_path / "c.yaml").write_text(yaml)
        argv = [*argv, "--config", str(tmp_path / "c.yaml")]
    assert main(["train", "--data", str(imagefolder), "--run-dir", str(tmp_path / "run"), *argv]) == 0
    assert taken == [expected]


def test_fine_tuning_speed_times_the_compiled_step_when_asked(imagefolder, tiny_config, monkeypatch):
    """benchmarks/compile_speed.py compares eager and compiled steps through the recipe's probe: asked, the probe
    must time the compiled module, compiled once, outside the timed steps; under --compile alone it stays eager."""
    compiled = []

    class Slow(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(0.2)
            return self.module(x)

    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or Slow(module))
    cfg = tiny_config(imagefolder, compile=True)
    model = model_from_config(cfg, ["a", "b", "c"])
    finetune_speed(model, 3, cfg, torch.device("cpu"))
    assert compiled == []  # the recipe's probe under --compile: eager (see finetune_speed)
    rate = finetune_speed(model, 3, cfg, torch.device("cpu"), compiled=True)
    assert compiled == [model] and rate <= cfg.optim.batch_size / 0.2  # every timed step ran the compiled module


def test_compile_on_a_cpu_warns_that_it_was_measured_no_faster(imagefolder, tiny_config, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module: module)  # the warning, not the compiling, is under test
    with pytest.warns(UserWarning, match="--compile on a CPU: measured no faster"):
        fit(tiny_config(imagefolder, compile=True, epochs=1))
