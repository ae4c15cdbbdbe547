"""``--unlabeled-judge``: which judge decides, the folds it trains on, and the guard it keeps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finegrain.engine import unlabeled_judge
from finegrain.engine.recipe import train
from finegrain.engine.setup import dataset_index
from finegrain.engine.unlabeled_judge import fold_manifests, judge_kind

from .conftest import make_imagefolder, write_images


def test_auto_judges_by_finetuning_only_small_labelled_sets_of_fixed_epoch_finetuning(tmp_path, tiny_config,
                                                                                       monkeypatch):  # fmt: skip
    root = make_imagefolder(tmp_path / "data", num_classes=3, per_class=10)
    small = tiny_config(root, unlabeled=str(root), freeze_backbone=False)
    assert judge_kind(small)[0] == "finetune"
    assert judge_kind(small.replace(unlabeled_judge="probe"))[0] == "probe"
    assert judge_kind(small.replace(pseudo_fraction=0.5))[0] == "probe"
    assert judge_kind(small.replace(budget=5.0))[0] == "probe"
    assert judge_kind(small.replace(freeze_backbone=True))[0] == "probe"
    assert judge_kind(small.replace(teachers=[str(tmp_path / "t.pt")]))[0] == "probe"
    assert judge_kind(small.replace(freeze_backbone=True, unlabeled_judge="finetune"))[0] == "finetune"
    monkeypatch.setattr(unlabeled_judge, "FINETUNE_JUDGE_MAX_IMAGES", 10)  # 3 classes x 6 training images: too many
    kind, why = judge_kind(small)
    assert kind == "probe" and "18 labelled training images" in why


def test_folds_hold_out_every_training_image_once_and_never_read_the_test_split(tmp_path, tiny_config):
    root = make_imagefolder(tmp_path / "data", num_classes=3, per_class=12)
    cfg = tiny_config(root, test_fraction=0.25)
    manifests = fold_manifests(cfg, tmp_path / "folds")
    rows = [list(csv.DictReader(m.open())) for m in manifests]
    held = [r["path"] for fold in rows for r in fold if r["split"] == "test"]
    trained = {r["path"] for fold in rows for r in fold if r["split"] == "train"}
    assert len(manifests) == 5 and len(held) == len(set(held)) and set(held) == trained  # each held out once
    assert len({frozenset(r["path"] for r in fold if r["split"] == "val") for fold in rows}) == 1  # val as it was
    split = {str(s.path.resolve()): s.split for s in dataset_index(cfg).samples}
    assert {split[p] for p in held} == {"train"}  # the run's test images are in no fold
    assert not any(split[r["path"]] == "test" for fold in rows for r in fold)


def test_many_labels_are_judged_on_fewer_folds_that_still_hold_out_every_image_once(tmp_path, tiny_config,
                                                                                    monkeypatch):  # fmt: skip
    root = make_imagefolder(tmp_path / "data", num_classes=3, per_class=12)
    cfg = tiny_config(root, test_fraction=0.25)
    monkeypatch.setattr(unlabeled_judge, "MANY_LABELS", 10)  # 3 classes x 7 training images: many
    manifests = fold_manifests(cfg, tmp_path / "folds")
    rows = [list(csv.DictReader(m.open())) for m in manifests]
    held = [r["path"] for fold in rows for r in fold if r["split"] == "test"]
    train = [r["path"] for r in rows[0] if r["split"] != "val"]
    assert len(manifests) == unlabeled_judge.FEW_FOLDS == 2
    assert sorted(held) == sorted(train), (len(held), len(train))  # every training image held out once
    assert [sum(r["split"] == "test" for r in fold) for fold in rows] == [11, 10]  # half the 21 labels each


def _judged_run(tmp_path, tiny_config, **options) -> tuple[dict, str]:
    """``train`` with ``--unlabeled-judge finetune`` on 4 classes (24 training images) and 32 unlabelled images of 4
    other classes: unlabeled.json and the kept run's config.yaml."""
    root = make_imagefolder(tmp_path / "data", num_classes=4, per_class=10)
    unl = tmp_path / "unlabelled"
    rng = np.random.default_rng(3)
    for c in range(4, 8):
        write_images(unl, c, 8, rng, start=10 * c)
    cfg = tiny_config(root, unlabeled=str(unl), unlabeled_judge="finetune", **options)
    train(cfg, given={"epochs"})  # epochs by hand: no budget, as `finegrain train --epochs 2` runs
    run = tmp_path / "run"
    return json.loads((run / "unlabeled.json").read_text()), (run / "config.yaml").read_text()


@pytest.mark.slow
def test_the_folds_train_and_answer_every_labelled_image_and_the_kept_run_follows_their_verdict(tmp_path, tiny_config):
    """Real trainings (a frozen backbone's head, cheap): every training image is answered once by a model that did
    not train on it, and the kept run is what the verdict says."""
    report, config = _judged_run(tmp_path, tiny_config, epochs=2)
    judge = report["judge"]
    assert judge["held_out_images"] == 24
    assert judge["use"] == (judge["paired_t"] > unlabeled_judge.MIN_T and judge["gain_images"] >= 0)
    assert 0 <= judge["labels_only_right"] <= 24 and 0 <= judge["unlabeled_right"] <= 24
    folds = sorted(p.name for p in (tmp_path / "run" / "unlabeled_judge").glob("*[0-9]"))
    assert folds == sorted(f"{s}{k}" for s in ("labels_only", "unlabeled") for k in range(5))
    if judge["use"]:
        assert report["fraction"] == 0.5 and report["pseudo_labelled"] and "pseudo_fraction: 0.5" in config
    else:
        assert report["fraction"] is None and report["pseudo_labelled"] == [] and "unlabeled: null" in config


def _fake_folds(monkeypatch, labels_only: float, unlabeled: float | None, lift: float = 0.0) -> None:
    """Fold trainings replaced by their answers: labels only answers the first ``labels_only`` share of each fold's
    held-out images right, with the unlabelled images the last ``unlabeled`` share (None: the same images as labels
    only); a right answer gives the true class probability 0.6, a wrong one 0.2 (a little more for some images), and
    with the unlabelled images ``lift`` more."""

    def fake_fit(cfg):  # the folds only: the kept run trains for real
        if Path(cfg.run.run_dir).parent.name != "unlabeled_judge":
            return real_fit(cfg)
        Path(cfg.run.run_dir).mkdir(parents=True, exist_ok=True)

    real_fit = unlabeled_judge.fit

    def fake_answers(run_dir, workers):
        fold = Path(run_dir).parent / f"fold{Path(run_dir).name[-1]}.csv"
        n = sum(row.endswith(",test") for row in fold.read_text().splitlines())
        if "labels_only" in Path(run_dir).name:
            hits, extra = torch.arange(n) < round(labels_only * n), 0.0
        else:
            last = torch.arange(n) >= n - round((unlabeled or 0) * n)
            hits, extra = (torch.arange(n) < round(labels_only * n)) if unlabeled is None else last, lift
        p = torch.where(hits, 0.6, 0.2) + 0.01 * (torch.arange(n) % 3) + extra
        return {"hits": hits.tolist(), "log_p": p.log().tolist()}

    monkeypatch.setattr(unlabeled_judge, "fit", fake_fit)
    monkeypatch.setattr(unlabeled_judge, "held_out_answers", fake_answers)


def test_the_guard_keeps_labels_only_unless_the_folds_gain_beyond_noise(tmp_path, tiny_config, monkeypatch):
    """The verdict from the folds' answers (24 held-out images): half right -> all right is beyond noise; half ->
    two thirds, on different images, is within it (t 0.9); losing never passes; the same answers right, but each
    true class surer (+0.1), passes on log-probabilities (the right-answer count alone refused it: +0 of 24). The
    kept run trains on what the verdict says (a judge whose verdict the final run ignored fails here)."""
    cases = [(0.5, 1.0, 0.0, True), (0.5, 2 / 3, 0.0, False), (5 / 6, 0.5, 0.0, False), (0.5, None, 0.1, True)]
    for k, (before, after, lift, use) in enumerate(cases):
        with monkeypatch.context() as m:
            _fake_folds(m, before, after, lift)
            run = tmp_path / str(k)
            report, config = _judged_run(run, tiny_config, epochs=1, run_dir=str(run / "run"))
        judge = report["judge"]
        assert judge["use"] is use, (before, after, lift, report["why"])
        assert judge["gain_images"] == judge["unlabeled_right"] - judge["labels_only_right"]
        assert (judge["gain_images"] > 0) is (after is not None and after > before)
        assert ("pseudo_fraction: 0.5" in config) is use and ("unlabeled: null" in config) is not use
        assert bool(report["pseudo_labelled"]) is use
