"""``finegrain tune``: a hyperparameter search within a time budget (Optuna: TPE sampler, median pruner, SQLite
storage, so a killed search resumes where it stopped).

Cheap trials first: the head on cached frozen features (seconds each once the features are cached): learning
rate, weight decay, label smoothing, dropout, epochs, mirrored views. Then, while the budget allows one, short
fine-tuning trials of the whole network from the best head so far (learning rate, crop scale, epochs), reported
per epoch so the median pruner stops the ones behind. Every trial is scored on the validation split.

The study folder holds ``study.db`` (the search, resumable), ``trials.csv``, ``search.png`` and ``best.yaml``:
``finegrain train --config best.yaml`` trains the best trial again.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import yaml

from finegrain.atomic import atomic_path, write_text
from finegrain.config import TrainConfig
from finegrain.engine.train import fit
from finegrain.errors import ConfigError
from finegrain.extras import has
from finegrain.progress import progress_bar
from finegrain.run_layout import RunDir

#: the least budget that holds one trial: the features of the data once (a minute or more on 2 cores for a few
#: thousand images) and a head fitted on them
MIN_BUDGET_MIN = 1.0


def _head_space(trial) -> dict:
    return {
        "head": "sgd", "freeze_backbone": True, "cache_features": True,
        "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-4, 0.3, log=True),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
        "drop_rate": trial.suggest_float("drop_rate", 0.0, 0.5),
        "epochs": trial.suggest_categorical("epochs", [15, 30, 60]),
        "feature_flip": trial.suggest_categorical("feature_flip", [True, False]),
    }  # fmt: skip


def _finetune_space(trial, init_from: str) -> dict:
    return {
        "freeze_backbone": False, "init_from": init_from, "freeze_bn_stats": True,
        "lr": trial.suggest_float("ft_lr", 3e-5, 1e-3, log=True),
        "scale_min": trial.suggest_float("scale_min", 0.2, 0.8),
        "epochs": trial.suggest_int("ft_epochs", 1, 4),
        "warmup_epochs": 0.25,
    }  # fmt: skip


def tune(base: TrainConfig, study_dir: str | Path, budget_min: float, trials: int = 50, seed: int = 0) -> dict:
    """Search within ``budget_min`` minutes (or ``trials`` trials in all, resumed ones counted); returns the best."""
    import optuna  # an optional dependency: pip install 'finegrain[tune]'

    if base.dataset.val_fraction <= 0:
        raise ConfigError("tune scores every trial on the validation split: set --val-fraction above 0 (e.g. 0.1)")
    if budget_min < MIN_BUDGET_MIN:
        raise ConfigError(f"--budget {budget_min:g} min is too small for one trial (the data's features are computed "
                          f"once first): give at least {MIN_BUDGET_MIN:g} minute(s)")  # fmt: skip
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="finegrain", storage=f"sqlite:///{study_dir / 'study.db'}", load_if_exists=True,
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )  # fmt: skip
    deadline = time.perf_counter() + 60 * budget_min
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]  # a killed trial is run again
    bar = progress_bar(total=trials, initial=len(done), desc="tune", unit="trial")

    def objective(trial) -> float:
        best_head = _best_run(study, "head")
        finetune = best_head is not None and trial.number % 3 == 2 and _finetune_fits(study, deadline)
        options = _finetune_space(trial, best_head) if finetune else _head_space(trial)
        trial.set_user_attr("kind", "finetune" if finetune else "head")
        run_dir = study_dir / f"trial{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        cfg = base.replace(**options, run_dir=str(run_dir))
        trial.set_user_attr("config", cfg.to_dict())
        start = time.perf_counter()

        def report(row: dict) -> None:
            trial.report(row["val_top1"], row["epoch"])
            if finetune and trial.should_prune():
                raise optuna.TrialPruned()

        history = fit(cfg, on_epoch=report).history
        trial.set_user_attr("seconds", time.perf_counter() - start)
        return max(r["val_top1"] for r in history)

    def progress(study, trial) -> None:
        bar.update(1)
        if any(t.value is not None for t in study.trials):
            bar.set_postfix(best_val_top1=f"{study.best_value:.4f}", kind=study.best_trial.user_attrs.get("kind"))
        _write_outputs(study, study_dir)

    left = max(0, trials - len(done))
    remaining_s = deadline - time.perf_counter()
    if left:
        study.optimize(objective, n_trials=left, timeout=remaining_s, callbacks=[progress], catch=())
    bar.close()
    _write_outputs(study, study_dir)
    if not any(t.value is not None for t in study.trials):
        raise ConfigError(f"no trial finished within --budget {budget_min:g} min: give a larger budget")
    best = study.best_trial
    return {"val_top1": best.value, "trial": best.number, "kind": best.user_attrs["kind"],
            "best_yaml": str(study_dir / "best.yaml"), "trials": len(study.trials)}  # fmt: skip


def _best_run(study, kind: str) -> str | None:
    """best.pt of the best finished trial of ``kind`` (fine-tuning trials start from the best head)."""
    done = [t for t in study.trials if t.value is not None and t.user_attrs.get("kind") == kind]
    return str(Path(max(done, key=lambda t: t.value).user_attrs["run_dir"]) / RunDir.BEST) if done else None


def _finetune_fits(study, deadline: float) -> bool:
    """Is there time for a fine-tuning trial as long as the longest one so far (or 3 head trials, before any)?"""
    heads = [t.user_attrs.get("seconds", 0) for t in study.trials if t.user_attrs.get("kind") == "head"]
    tunes = [t.user_attrs.get("seconds", 0) for t in study.trials if t.user_attrs.get("kind") == "finetune"]
    need = max(tunes) if tunes else 3 * max(heads, default=0)
    return time.perf_counter() + need < deadline


def _write_outputs(study, study_dir: Path) -> None:
    """trials.csv, search.png and best.yaml (the best trial's whole config, minus its run folder)."""
    rows = [{"trial": t.number, "state": t.state.name, "kind": t.user_attrs.get("kind"), "val_top1": t.value,
             "seconds": round(t.user_attrs.get("seconds", 0), 1), **t.params} for t in study.trials]  # fmt: skip
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(study_dir / "trials.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    finished = [t for t in study.trials if t.value is not None]
    if not finished or not has("plots"):  # search.png needs the plots extra; trials.csv has the numbers
        return
    import matplotlib  # noqa: PLC0415 - the plots extra

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, colour in (("head", "tab:blue"), ("finetune", "tab:orange")):
        pts = [(t.number, t.value) for t in finished if t.user_attrs.get("kind") == kind]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=18, color=colour, label=kind)
    best, line = -1.0, []
    for t in sorted(finished, key=lambda t: t.number):
        best = max(best, t.value)
        line.append((t.number, best))
    ax.step(*zip(*line, strict=True), where="post", color="black", lw=1, label="best so far")
    pruned = [t.number for t in study.trials if t.state.name == "PRUNED"]
    ax.set(xlabel="trial", ylabel="validation top-1", title=f"finegrain tune ({len(pruned)} pruned)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(study_dir / "search.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    config = dict(study.best_trial.user_attrs["config"])
    config["run"] = {**config["run"], "run_dir": None}
    write_text(study_dir / "best.yaml", yaml.safe_dump(config, sort_keys=False))
