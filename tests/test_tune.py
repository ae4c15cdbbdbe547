"""finegrain tune: a resumable Optuna search whose best.yaml trains again through `finegrain train --config`."""

import csv

import pytest
import yaml

import finegrain.engine.tune as tune_module
from finegrain.cli import main
from finegrain.errors import ConfigError


@pytest.mark.slow
def test_three_trials_resume_after_a_kill_and_best_yaml_trains(imagefolder, tiny_config, tmp_path, monkeypatch):
    base = tiny_config(imagefolder)
    study = tmp_path / "study"
    real_fit = tune_module.fit
    calls = []

    def killed_on_second_trial(cfg, **kwargs):
        calls.append(cfg)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the search is killed in the middle of its second trial
        return real_fit(cfg, **kwargs)

    monkeypatch.setattr(tune_module, "fit", killed_on_second_trial)
    with pytest.raises(KeyboardInterrupt):
        tune_module.tune(base, study, budget_min=5, trials=3)
    monkeypatch.setattr(tune_module, "fit", real_fit)
    result = tune_module.tune(base, study, budget_min=5, trials=3)  # resumes: the finished trial is kept
    with (study / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    finished = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(finished) == 3 and rows[0]["state"] == "COMPLETE"  # trial 0 from before the kill
    assert result["val_top1"] == max(float(r["val_top1"]) for r in finished) > 0.5
    assert (study / "search.png").stat().st_size > 0
    best = yaml.safe_load((study / "best.yaml").read_text())
    assert best["run"]["run_dir"] is None
    assert main(["train", "--config", str(study / "best.yaml"), "--run-dir", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "best.pt").is_file()


def test_bad_input_is_refused_with_the_fix(imagefolder, tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="val-fraction"):
        tune_module.tune(tiny_config(imagefolder, val_fraction=0.0), tmp_path / "s", budget_min=5)
    with pytest.raises(ConfigError, match="at least"):
        tune_module.tune(tiny_config(imagefolder), tmp_path / "s", budget_min=0.1)
