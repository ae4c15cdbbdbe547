"""``--unlabeled-judge finetune``: whether the unlabelled images help, judged by the run's own training on folds.

The probe judge (``engine/addons/unlabeled.py``) refits a logistic-regression probe with pseudo-labels, and a probe
barely moves with them: on plantvillage_tomato with 30% of its labels (180 labelled images) it refused the
unlabelled images on all three seeds (+0, +5, +3 held-out images against noise 4.2, 6.2, 5.4), while fine-tuning on
them gained 2-12 pt test top-1. Here the judge is the training itself: per fold of a stratified ``CV_FOLDS``-fold
split of the labelled training images, the run's options train on the other folds twice, with the labels alone and
with the probe teacher's ``JUDGE_FRACTION`` most confident pseudo-labels, and both answer the held-out fold. The
unlabelled images are used only where the second gives the held-out images' true classes a higher log-probability
by a paired t above ``MIN_T``, and answers no fewer of them right. On tomato (AMD Zen 5, seeds 0-2): t 10.0, 2.7 and
5.5, all used (the count of right answers, the guard before: +29, +1 and +24 of 160 against noise 9.8, 7.5 and 9.0,
refused seed 1, whose kept model then scored 67.3% against 84.7% with the pseudo-labels; docs/labels.md).

It costs ``2 x CV_FOLDS`` trainings on 80% of the labels before the real one; above ``MANY_LABELS`` labelled
images, ``FEW_FOLDS`` (four trainings on half the labels: every labelled image is still held out once, so the
judgement sees as many answers, at a quarter of the training). ``auto`` uses it for labelled sets up to
``FINETUNE_JUDGE_MAX_IMAGES`` of a run that fine-tunes for a fixed number of epochs; elsewhere (a frozen backbone,
whose head the probe judge models well, a ``--budget`` run, streamed shards, more labels) the probe judges. The fold
runs live in ``RUN_DIR/unlabeled_judge/``: a run that stopped resumes from the folds it finished.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path

import torch
from scipy.stats import ttest_1samp

from finegrain.atomic import write_text
from finegrain.config import TrainConfig
from finegrain.data.source import data_source
from finegrain.engine.addons.unlabeled import CV_FOLDS, beyond_noise, held_out_splits
from finegrain.engine.evaluate import right, run_answers
from finegrain.engine.setup import dataset_index, run_dir_for
from finegrain.engine.train import FitResult, fit
from finegrain.progress import say
from finegrain.run_layout import RunDir

#: the pseudo-label fraction the folds try (each predicted class's most confident half): on tomato at 30% labels,
#: unguarded maps fine-tuning with the half went from 74.4 to 81.4% test top-1 (Intel Xeon) and 72.4 to 83.8% (AMD
#: Zen 5), with all of them 82.3% (Zen 5; seed means of 0-2, docs/labels.md). More fractions would multiply the cost.
JUDGE_FRACTION = 0.5
#: above this many labelled training images the judge trains ``FEW_FOLDS`` folds, not ``CV_FOLDS``: tomato's 160
#: cost 10 fold runs of about 40 s each on 2 cores of an AMD Zen 5 (``--train-stages 2 --epochs 10``: 6.5 minutes,
#: against 45 s for the run itself); cub100's 879, with 2,024 unlabelled images, would cost about an hour in 5 folds
MANY_LABELS = 400
#: folds above ``MANY_LABELS``: each trains on half the labels, and the judgement still reads every labelled image
#: once (cub100 at 30% labels: 780 held-out answers, against 160 for tomato's five folds). Measured there (AMD Zen 5,
#: seeds 0-2): paired t 18.1, 17.2, 22.2, the half used on each, 86.45% test top-1 against 79.23% labels only
FEW_FOLDS = 2
#: ``auto`` judges by fine-tuning up to this many labelled training images; the probe judges above
FINETUNE_JUDGE_MAX_IMAGES = 2000
FOLDER = "unlabeled_judge"
#: the paired t of the held-out images' true-class log-probability (with pseudo-labels minus without) above which the
#: unlabelled images are used (about one-sided 2.5%). Why log-probabilities, not right answers: a right/wrong count
#: wastes how sure each answer is. On tomato (30% labels, AMD Zen 5, seeds 0-2) the right answers rose by +29, +1
#: and +24 of 160 (noise 9.8, 7.5, 9.0: seed 1 refused, and its kept run lost 17 pt test top-1 to the pseudo-labelled
#: one); the log-probabilities gave t 10.0, 2.7 and 5.5: all three used.
MIN_T = 2.0
#: log-probabilities below this count as this: one image the model is sure is another class cannot outweigh the rest
LOG_P_FLOOR = math.log(1e-4)


def judge_kind(cfg: TrainConfig) -> tuple[str, str]:
    """``("finetune" | "probe", why)`` for a run with ``--unlabeled``."""
    wanted = cfg.labels.unlabeled_judge
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "probe", "under torchrun: the folds train one at a time in one process"
    if wanted == "probe":
        return "probe", "--unlabeled-judge probe"
    if cfg.labels.pseudo_fraction is not None:
        return "probe", "--pseudo-fraction given: that fraction is used, not judged"
    if cfg.recipe.budget:
        return "probe", "a --budget run: the folds' trainings would not fit its minutes"
    if cfg.distill.teachers and wanted == "auto":
        return "probe", "--teachers saw every labelled image: folds judged with their labels would be optimistic"
    if cfg.model.freeze_backbone and wanted == "auto":
        return "probe", "a frozen backbone: the probe judge models its head"
    index = dataset_index(cfg)
    if not data_source(index).listed:
        return "probe", "streamed shards: the folds need every training image by name"
    if wanted == "auto" and index.count("train") > FINETUNE_JUDGE_MAX_IMAGES:
        return (
            "probe",
            f"{index.count('train')} labelled training images (> {FINETUNE_JUDGE_MAX_IMAGES}): folds cost too much",
        )
    return "finetune", f"--unlabeled-judge {wanted}"


def judge_folds(images: int) -> int:
    """How many folds the judge trains for ``images`` labelled training images."""
    return CV_FOLDS if images <= MANY_LABELS else FEW_FOLDS


def held_out_answers(run_dir: Path, workers: int) -> dict:
    """The run's ``best.pt`` on the test images of its own split (in split order): which it answers right
    (``hits``) and the log-probability it gives their true class (``log_p``, floored at ``LOG_P_FLOOR``)."""
    m = run_answers(run_dir, "test", workers)
    return {"hits": right(m),
            "log_p": [max(v, LOG_P_FLOOR) for v in m["true_log_p"]]}  # fmt: skip


def paired_t(diff: torch.Tensor) -> float:
    """The paired t statistic of per-image differences (scipy's one-sample t against 0; 0 where it is undefined)."""
    with warnings.catch_warnings():  # constant differences: scipy warns, and gives inf or nan
        warnings.simplefilter("ignore", RuntimeWarning)
        t = float(ttest_1samp(diff.double().numpy(), 0.0).statistic) if len(diff) > 1 else math.nan
    return 0.0 if math.isnan(t) else t


def fold_manifests(cfg: TrainConfig, folder: Path) -> list[Path]:
    """One manifest per fold: the other folds train, the fold is the test split, validation stays as it is (the
    run's test split is never read)."""
    index = dataset_index(cfg)
    train, val = index.split("train"), index.split("val")
    manifests = []
    labels = torch.tensor([s.label for s in train])
    for k, (_, held) in enumerate(held_out_splits(labels, None, judge_folds(len(train)))):
        held = set(held.tolist())
        rows = [
            [s.path.resolve(), index.classes[s.label], "test" if i in held else "train"] for i, s in enumerate(train)
        ]
        rows += [[s.path.resolve(), index.classes[s.label], "val"] for s in val]
        manifests.append(folder / f"fold{k}.csv")
        if not manifests[-1].is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with manifests[-1].open("w", newline="") as fh:
                csv.writer(fh).writerows([["path", "label", "split"], *rows])
    return manifests


def judge_by_finetuning(cfg: TrainConfig, run_dir: Path) -> dict:
    """Train labels-only and with pseudo-labels on every fold; the held-out images each answers right, and whether
    the pseudo-labels are used (``use``) and why."""
    folder = run_dir / FOLDER
    manifests = fold_manifests(cfg, folder)
    if not manifests:
        return {"use": False, "why": "too few images per class for folds: labels only (the guard cannot judge)"}
    answers: dict[str, list[dict]] = {"labels_only": [], "unlabeled": []}
    for k, manifest in enumerate(manifests):
        for setting, extra in (
            ("labels_only", {"unlabeled": None}),
            ("unlabeled", {"pseudo_fraction": JUDGE_FRACTION}),
        ):
            fold_dir = folder / f"{setting}{k}"
            done = fold_dir / "held_out.json"
            if not done.is_file():
                say(f"--unlabeled-judge: fold {k + 1}/{len(manifests)}, {setting.replace('_', ' ')}")
                fold_cfg = cfg.replace(data=str(manifest), format="manifest", run_dir=str(fold_dir), **extra)
                fit(fold_cfg)
                write_text(done, json.dumps(held_out_answers(fold_dir, cfg.speed.workers)))
            answers[setting].append(json.loads(done.read_text()))
    base, semi = ({key: torch.tensor([v for a in answers[s] for v in a[key]]) for key in ("hits", "log_p")}
                  for s in ("labels_only", "unlabeled"))  # fmt: skip
    gain, noise = beyond_noise(semi["hits"], base["hits"])
    t = paired_t(semi["log_p"] - base["log_p"])
    use = t > MIN_T and gain >= 0
    where = f"{len(base['hits'])} labelled images held out in {len(manifests)} folds, each trained on the others"
    why = (f"fine-tuning judge: with the {JUDGE_FRACTION:g} most confident pseudo-labels, on {where}, the true "
           f"class's log-probability {'rose' if t > 0 else 'fell'} (paired t {t:.1f}; used above {MIN_T:g}) and "
           f"{gain:+d} answered right (noise {noise:.1f}): {'used' if use else 'labels only'}")  # fmt: skip
    return {"use": bool(use), "why": why, "fraction": JUDGE_FRACTION, "held_out_images": len(base["hits"]),
            "labels_only_right": int(base["hits"].sum()), "unlabeled_right": int(semi["hits"].sum()),
            "gain_images": gain, "noise_images": round(noise, 1), "paired_t": round(t, 2),
            "log_p_gain": round(float((semi["log_p"] - base["log_p"]).mean()), 4)}  # fmt: skip


def fit_judged(cfg: TrainConfig) -> FitResult:
    """``fit`` with the fine-tuning judge deciding whether ``--unlabeled``'s images join; RUN_DIR/unlabeled.json
    carries the judgement (``judge``) either way."""
    run_dir = run_dir_for(cfg)  # one folder for the folds and the kept run
    cfg = cfg.replace(run_dir=str(run_dir))
    judgement = judge_by_finetuning(cfg, run_dir)
    say(f"--unlabeled: {'used' if judgement['use'] else 'labels only'} ({judgement['why']})")
    final = cfg.replace(pseudo_fraction=JUDGE_FRACTION) if judgement["use"] else cfg.replace(unlabeled=None)
    result = fit(final)
    report_path = run_dir / RunDir.UNLABELED
    report = json.loads(report_path.read_text()) if report_path.is_file() else {
        "unlabeled": cfg.labels.unlabeled, "fraction": None, "pseudo_labelled": []}  # fmt: skip
    report.update({"why": judgement["why"], "judge": judgement})
    write_text(report_path, json.dumps(report, indent=2))
    return result
