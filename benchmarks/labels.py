"""Labels that cost less, measured: the label audit, training with unlabelled images, training with wrong labels,
and which images to label next. Each part adds its key to the JSON (``--parts``, default all):

- ``audit``: cub100's training photos with 20% and 40% of their labels flipped, symmetric (to any other class,
  uniformly) and pair-flip (to the class whose mean frozen feature is nearest: a similar species, the realistic
  mistake). ``finegrain data audit`` sees only the noisy labels; its flags are scored against the flipped set.
- ``semi``: cub100 and plantvillage_tomato with 30% of each class's training labels kept and the other 70% given as
  unlabelled images: ``finegrain train`` (every default) with the labels only, with ``--unlabeled``, and with 100% of
  the labels; test top-1 and the share of the gap to full labels that the unlabelled images close. With ``--budget
  MINUTES`` every run is the budgeted recipe (head, then fine-tuning), and the noisy student joins: the labels-only
  run's fine-tuned ``best.pt`` pseudo-labels the unlabelled images (``--teachers``); ``--semi-settings`` picks the
  runs (``SEMI_SETTINGS``). Finished runs are kept in the work folder and skipped on a re-run.
- ``noisy``: cub100 with flipped labels (as ``audit``): ``finegrain train`` plain vs ``--label-noise prune``.
- ``pretrain``: the ``semi`` setting on cub100 with and without ``finegrain pretrain`` (SimSiam from the ImageNet
  weights on the 70% unlabelled images, ``--pretrain-epochs``): test top-1 of ``finegrain train`` on the 30% labels.
- ``suggest``: a simulated labelling loop on cub100 (5 labels per class, then 3 rounds of 100 more): the probe's test
  top-1 after each round, with the images ``finegrain data suggest`` picks vs random ones.

Every choice inside a run is made on its validation split; test top-1 is the trained head on the test photos'
cached frozen features (what ``finegrain evaluate`` computes, without decoding them again). One feature extraction
serves everything (the per-image feature cache).

    python benchmarks/labels.py --seeds 0 1 --out benchmarks/results/labels.json
    python benchmarks/labels.py --parts semi noisy suggest --seeds 0 1
    python benchmarks/labels.py --parts semi --budget 5 --seeds 0 1 --work-dir /tmp/fg-labels-budget
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig, default_cache_dir
from finegrain.data import load_dataset
from finegrain.engine.features import extract_features
from finegrain.engine.probe import accuracy, fit_probe, l2_normalise
from finegrain.engine.recipe import train
from finegrain.labels.audit import audit_labels
from finegrain.labels.pretrain import pretrain
from finegrain.labels.suggest import select
from finegrain.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from peer_timm import DATASETS  # noqa: E402


def nearest_class(index, cache_dir: str) -> np.ndarray:
    """For each class, the other class with the nearest mean (L2-normalised) frozen feature."""
    train = index.split("train")
    model = create_model("baseline", num_classes=len(index.classes)).eval()
    feats = extract_features(model, train, model.preprocess, torch.device("cpu"), amp="auto", channels_last=True,
                             cache_dir=cache_dir)  # fmt: skip
    feats = torch.nn.functional.normalize(feats, dim=1)
    labels = torch.tensor([s.label for s in train])
    means = torch.nn.functional.normalize(torch.stack([feats[labels == k].mean(0) for k in range(len(index.classes))]))
    sim = means @ means.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(1).numpy()


def noisy_manifest(index, rate: float, kind: str, pair: np.ndarray, seed: int, path: Path) -> set[str]:
    """The training photos with ``rate`` of their labels flipped (test photos kept, unaudited); the flipped paths."""
    rng = np.random.default_rng(seed)
    train = index.split("train")
    flip = set(rng.permutation(len(train))[: round(rate * len(train))].tolist())
    n = len(index.classes)
    flipped, rows = set(), []
    for i, s in enumerate(train):
        label = s.label
        if i in flip:
            label = int(pair[s.label]) if kind == "pair" else int((s.label + rng.integers(1, n)) % n)
            flipped.add(str(s.path.resolve()))
        rows.append([str(s.path.resolve()), index.classes[label], "train"])
    rows += [[str(s.path.resolve()), index.classes[s.label], "test"] for s in index.split("test")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "split"], *rows])
    return flipped


def write_rows(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_hits(run_dir: Path, cache_dir: str) -> torch.Tensor:
    """Which of the run's test photos its best.pt answers right (bool, in the manifest's order): its head on their
    cached features (at the view it chose)."""
    ckpt = Checkpoint.load(run_dir / "best.pt")
    model = ckpt.build_model().eval()
    test = ckpt.dataset().split("test")
    feats = extract_features(model, test, model.preprocess, torch.device("cpu"), amp="auto", cache_dir=cache_dir,
                             desc="test")  # fmt: skip
    with torch.inference_mode():
        return model.head(feats).argmax(1) == torch.tensor([s.label for s in test])


def test_top1(run_dir: Path, cache_dir: str) -> float:
    """The run's best.pt on its test photos, top-1 in percent."""
    return 100 * float(test_hits(run_dir, cache_dir).float().mean())


def train_top1(manifest: Path, run_dir: Path, seed: int, cache_dir: str, **options) -> dict:
    """Train (``--budget``: through the recipe) and return ``{"test_top1": ...}``, with a budgeted run's test top-1
    of each stage (``"stages"``: the head, and the fine-tuned network whether or not the recipe kept it). Saved in
    ``run_dir/top1.json``: a re-run with the same ``--work-dir`` skips finished runs (and adds missing stages)."""
    done = run_dir / "top1.json"
    result = json.loads(done.read_text()) if done.is_file() else {}
    if not result:
        cfg = TrainConfig().replace(data=str(manifest), run_dir=str(run_dir), seed=seed, cache_dir=cache_dir, **options)
        # as `finegrain train` runs the options (budget 0: as given, e.g. the head, or maps epochs with
        # --unlabeled's judge: engine/unlabeled_judge.py)
        train(cfg if cfg.recipe.budget is not None else cfg.replace(budget=0))
        result = {"test_top1": test_top1(run_dir, cache_dir)}
    recipe = json.loads((run_dir / "recipe.json").read_text()) if (run_dir / "recipe.json").is_file() else {}
    if "stages" not in result and "stages" in recipe:  # a budgeted run (a head's recipe.json has no stages)
        result["stages"] = {s: result["test_top1"] if s == recipe["kept"] else test_top1(run_dir / s, cache_dir)
                            for s in recipe["stages"]}  # fmt: skip
    done.write_text(json.dumps(result))
    return result


def audit_part(args, work: Path, index, pair: np.ndarray) -> dict:
    results: dict = {}
    for kind in ("symmetric", "pair"):
        for rate in args.rates:
            runs = []
            for seed in args.seeds:
                manifest = work / f"{kind}{rate}_{seed}" / "manifest.csv"
                flipped = noisy_manifest(index, rate, kind, pair, seed, manifest)
                noisy = load_dataset(manifest, val_fraction=0.0)
                issues, summary = audit_labels(noisy, seed=seed, cache_dir=args.cache_dir, device="cpu")
                found = {str(e.sample.path.resolve()) for e in issues}
                hits = len(found & flipped)
                runs.append({"flipped": len(flipped), "flagged": len(found), "precision": hits / max(1, len(found)),
                             "recall": hits / len(flipped),
                             "out_of_fold_top1": summary["out_of_fold_top1"]})  # fmt: skip
            key = f"{kind}_{int(100 * rate)}"
            results[key] = {
                k: statistics.mean(r[k] for r in runs) for k in ("precision", "recall", "out_of_fold_top1")
            } | {"seeds": runs}
            print(f"cub100 audit {key}: precision {100 * results[key]['precision']:.1f}%, "
                  f"recall {100 * results[key]['recall']:.1f}%")  # fmt: skip
    return {"cub100": results}


def few_labels(name: str, seed: int, fraction: float, folder: Path) -> tuple:
    """``fraction`` of each class's training labels kept (a manifest with the test split), the rest listed as
    unlabelled images; also the full manifest. Returns (index, few.csv, full.csv, unlabelled.csv, kept, unlabelled)."""
    index = load_dataset(DATASETS[name], val_fraction=0.0, seed=seed)
    rng = np.random.default_rng(seed)
    kept, unlabelled = [], []
    for k in range(len(index.classes)):
        mine = [s for s in index.split("train") if s.label == k]
        order = rng.permutation(len(mine))
        n = math.ceil(fraction * len(mine))
        kept += [mine[i] for i in order[:n]]
        unlabelled += [mine[i] for i in order[n:]]
    rows = [[str(s.path.resolve()), index.classes[s.label], sp] for sp, group in
            (("train", kept), ("test", index.split("test"))) for s in group]  # fmt: skip
    full = [[str(s.path.resolve()), index.classes[s.label], s.split] for s in index.samples]
    few = write_rows(folder / "few.csv", [["path", "label", "split"], *rows])
    everything = write_rows(folder / "full.csv", [["path", "label", "split"], *full])
    unl = write_rows(folder / "unlabelled.csv", [["path"], *[[str(s.path.resolve())] for s in unlabelled]])
    return index, few, everything, unl, kept, unlabelled


def pretrain_part(args, work: Path) -> dict:
    """The semi setting on cub100: finegrain train on the 30% labels from ImageNet weights vs from a SimSiam pass."""
    runs = []
    for seed in args.seeds:
        folder = work / "pretrain" / f"cub100{seed}"
        _, few, _, unl, _, _ = few_labels("cub100", seed, args.label_fraction, folder)
        start = time.perf_counter()
        weights = pretrain(unl, folder / "simsiam", "tf_efficientnet_lite0", epochs=args.pretrain_epochs, seed=seed)
        pretrain_s = time.perf_counter() - start
        row = {"imagenet": train_top1(few, folder / "imagenet", seed, args.cache_dir)["test_top1"],
               "pretrained": train_top1(few, folder / "pretrained", seed, args.cache_dir,
                                        weights=str(weights))["test_top1"],
               "pretrain_s": round(pretrain_s, 1), "pretrain_epochs": args.pretrain_epochs,
               "adapt_stages": json.loads((weights.parent / "pretrain.json").read_text())["adapt_stages"]}  # fmt: skip
        runs.append(row)
        print(f"pretrain seed {seed}: {row}")
    out = {k: statistics.mean(r[k] for r in runs) for k in ("imagenet", "pretrained")}
    return {"cub100": out | {"label_fraction": args.label_fraction, "seeds": runs}}


#: the last 2 stages and the head trained on cached maps for 10 epochs (``--train-stages``): where ``--consistency``
#: applies, so its labels-only and full-labels references train the same way
MAPS = {"freeze_backbone": False, "train_stages": 2, "epochs": 10}

#: the semi part's runs: (run folder, manifest: the 30% labels or all, options). Labels only, + ``--unlabeled`` (the
#: probe teacher), 100% of the labels and, with ``--budget``, the noisy student: ``--unlabeled`` with the labels-only
#: run's kept ``best.pt`` as the teacher, distilling too (kd-alpha 0.5), or only pseudo-labelling (kd-alpha 0); with
#: both of its stages (head and fine-tuned network) as teachers (``_soft``: distilling too, their soft labels fixed per
#: image, as ``--kd-targets auto`` has it with ``--unlabeled``; ``_online``: the teachers run on every batch, what
#: ``_soft`` did until 2026-11-29); and a second round, the
#: first student (taught by both stages) teaching with its fine-tuned network, or the kept ``best.pt`` of the first
#: student taught by the kept stage (``_kept``); ``maps_*``: the last stages on cached maps, with the unlabelled
#: images' pseudo-labels (as judged, or ``_pseudo_half`` / ``_all``: the most confident half per class or all,
#: unjudged; ``_round2``: all, labelled by the ``_pseudo_half`` student), and with ``--consistency`` (FixMatch) on
#: them too. ``teachers`` names the run folders
#: whose ``best.pt`` teach.
SEMI_SETTINGS: dict[str, tuple[str, str, dict]] = {
    "labels_only": ("few", "few", {}),
    "with_unlabeled": ("semi", "few", {"unlabeled": True}),
    "full_labels": ("full", "full", {}),
    "noisy_student": ("student", "few", {"unlabeled": True, "teachers": ("few",)}),
    "noisy_student_hard": ("student_hard", "few", {"unlabeled": True, "teachers": ("few",), "kd_alpha": 0.0}),
    "noisy_student_stages": ("student_stages", "few", {"unlabeled": True, "teachers": ("few/head", "few/finetune"),
                                                       "kd_alpha": 0.0}),
    "noisy_student_stages_soft": ("student_stages_soft", "few", {"unlabeled": True,
                                                                 "teachers": ("few/head", "few/finetune")}),
    "noisy_student_stages_online": ("student_stages_online", "few", {"unlabeled": True, "kd_targets": "online",
                                                                     "teachers": ("few/head", "few/finetune")}),
    "noisy_student_round2_kept": ("student_round2", "few", {"unlabeled": True, "teachers": ("student_hard",),
                                                            "kd_alpha": 0.0}),
    "noisy_student_round2": ("student_round2_ft", "few", {"unlabeled": True,
                                                          "teachers": ("student_stages/finetune",), "kd_alpha": 0.0}),
    "maps_labels_only": ("maps_few", "few", MAPS),
    "maps_unlabeled": ("maps_unlabeled", "few", {**MAPS, "unlabeled": True}),
    "maps_consistency": ("maps_consistency", "few", {**MAPS, "unlabeled": True, "consistency": 1.0}),
    "maps_pseudo_half": ("maps_pseudo_half", "few", {**MAPS, "unlabeled": True, "pseudo_fraction": 0.5}),
    "maps_pseudo_all": ("maps_pseudo_all", "few", {**MAPS, "unlabeled": True, "pseudo_fraction": 1.0}),
    "maps_full_labels": ("maps_full", "full", MAPS),
    # a second round: the unguarded half's student pseudo-labels all the unlabelled images (hard labels)
    "maps_round2": ("maps_round2", "few", {**MAPS, "unlabeled": True, "teachers": ("maps_pseudo_half",),
                                           "kd_alpha": 0.0, "pseudo_fraction": 1.0}),
}  # fmt: skip


def semi_part(args, work: Path) -> dict:
    """30% of each class's training labels kept, 70% given unlabelled: labels only, + --unlabeled, 100% labels
    (with ``--budget``: the budgeted recipe for each, and the noisy student)."""
    results: dict = {}
    extra = {"budget": args.budget} if args.budget else {}
    settings = args.semi_settings
    for name in args.semi_datasets:
        runs = []
        for seed in args.seeds:
            folder = work / "semi" / f"{name}{seed}"
            index, few, everything, unl, kept, unlabelled = few_labels(name, seed, args.label_fraction, folder)
            row = {"labelled": len(kept), "unlabelled": len(unlabelled)}
            for setting in settings:
                sub, manifest, options = SEMI_SETTINGS[setting]
                options = dict(options)  # filled in per seed: SEMI_SETTINGS itself stays as written
                if "unlabeled" in options:
                    options["unlabeled"] = str(unl)
                if "teachers" in options:
                    options["teachers"] = [str(folder / t / "best.pt") for t in options["teachers"]]
                run_dir = folder / sub
                result = train_top1(few if manifest == "few" else everything, run_dir, seed, args.cache_dir,
                                    **extra, **options)  # fmt: skip
                row[setting] = result["test_top1"]
                for stage, suffix in (("finetune", "_finetuned"), ("head", "_head")):  # kept by the recipe or not
                    if stage in result.get("stages", {}):
                        row[setting + suffix] = result["stages"][stage]
                if "unlabeled" in options:
                    report = json.loads((run_dir / "unlabeled.json").read_text())
                    row[f"{setting}_pseudo"] = {"fraction_chosen": report["fraction"],
                                                "pseudo_labelled": len(report["pseudo_labelled"]),
                                                "pseudo_label_accuracy": _pseudo_accuracy(report, index)}  # fmt: skip
                if args.budget:
                    row[f"{setting}_recipe"] = json.loads((run_dir / "recipe.json").read_text())["kept"]
            runs.append(row)
            print(f"{name} seed {seed}: {row}")
        results[name] = {"label_fraction": args.label_fraction, "seeds": runs}
        for suffix in ("", "_finetuned", "_head") if args.budget else ("",):
            keys = [k + suffix for k in settings if all(k + suffix in r for r in runs)]
            for k in keys:
                results[name][k] = statistics.mean(r[k] for r in runs)
                results[name][f"{k}_sd"] = statistics.stdev(r[k] for r in runs) if len(runs) > 1 else None
            maps = [k for k in settings if k.startswith("maps_")]
            others = [k for k in settings if k not in maps]
            for low, high, ks in (("labels_only", "full_labels", others),
                                  ("maps_labels_only", "maps_full_labels", maps)):  # fmt: skip
                _gaps(results[name], runs, keys, low + suffix, high + suffix, [k + suffix for k in ks])
    return results


def _gaps(out: dict, runs: list, keys: list, low: str, high: str, candidates: list) -> None:
    """The share of the gap from ``low`` to ``high`` each unlabelled-images setting closes, per seed and of means."""
    if not {low, high} <= set(keys):
        return
    for k in candidates:
        if k not in keys or "unlabeled" not in SEMI_SETTINGS[k.removesuffix("_finetuned").removesuffix("_head")][2]:
            continue
        key = "gap_closed" if k == "with_unlabeled" else f"{k}_gap_closed"
        # None where labels only did as well as full labels: there is no gap to close
        gap = [(r[k] - r[low]) / (r[high] - r[low]) if r[high] > r[low] else None for r in runs]
        out[key] = None if None in gap else statistics.mean(gap)
        mean = {x: out[x] for x in (k, low, high)}  # of the means: defined more often
        out[f"{key}_of_means"] = (mean[k] - mean[low]) / (mean[high] - mean[low]) if mean[high] > mean[low] else None


def _pseudo_accuracy(report: dict, index) -> float | None:
    truth = {str(s.path.resolve()): index.classes[s.label] for s in index.samples}
    pairs = [(truth.get(str(Path(p).resolve())), label) for p, label, _ in report["pseudo_labelled"]]
    return sum(t == lab for t, lab in pairs) / len(pairs) if pairs else None


def noisy_part(args, work: Path, index, pair: np.ndarray) -> dict:
    results: dict = {}
    for kind in ("symmetric", "pair"):
        for rate in args.rates:
            runs = []
            for seed in args.seeds:
                folder = work / "noisy" / f"{kind}{rate}_{seed}"
                manifest = folder / "manifest.csv"
                noisy_manifest(index, rate, kind, pair, seed, manifest)
                plain = train_top1(manifest, folder / "plain", seed, args.cache_dir)
                pruned = train_top1(manifest, folder / "prune", seed, args.cache_dir, label_noise="prune")
                left_out = json.loads((folder / "prune" / "label_noise.json").read_text())["left_out"]
                runs.append({"plain": plain, "prune": pruned, "left_out": left_out})
            key = f"{kind}_{int(100 * rate)}"
            results[key] = {k: statistics.mean(r[k] for r in runs) for k in ("plain", "prune")} | {"seeds": runs}
            print(f"cub100 {key}: plain {results[key]['plain']:.2f}  --label-noise prune {results[key]['prune']:.2f}")
    return {"cub100": results}


def suggest_part(args) -> dict:
    """Start with 5 labels per class; 3 rounds of 100 more, picked by ``select`` or at random; probe test top-1."""
    index = load_dataset(DATASETS["cub100"], val_fraction=0.1)
    model = create_model("baseline", num_classes=len(index.classes)).eval()
    feats = {sp: extract_features(model, index.split(sp), model.preprocess, torch.device("cpu"), amp="auto",
                                  cache_dir=args.cache_dir, desc=sp) for sp in ("train", "val", "test")}  # fmt: skip
    labels = {sp: torch.tensor([s.label for s in index.split(sp)]) for sp in feats}
    k = len(index.classes)
    curves: dict = {"suggested": [], "random": []}
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        start = np.concatenate([rng.permutation(np.flatnonzero(labels["train"].numpy() == c))[:5] for c in range(k)])
        for how in curves:
            labelled = list(start)
            curve = []
            for r in range(4):
                probe = fit_probe(feats["train"][labelled], labels["train"][labelled], feats["val"], labels["val"], k)
                curve.append({"labels": len(labelled), "test_top1": 100 * accuracy(probe["weight"], probe["bias"],
                              l2_normalise(feats["test"]), labels["test"])})  # fmt: skip
                if r == 3:
                    break
                pool = np.setdiff1d(np.arange(len(labels["train"])), labelled)
                if how == "random":
                    new = rng.choice(pool, 100, replace=False)
                else:
                    x = feats["train"][pool]
                    probs = (l2_normalise(x) @ probe["weight"].T + probe["bias"]).softmax(1)
                    new = pool[select(x, probs, 100, feats["train"][labelled])]
                labelled += list(new)
            curves[how].append(curve)
            print(f"suggest seed {seed} {how}: " + ", ".join(f"{c['labels']}: {c['test_top1']:.2f}" for c in curve))
    summary = {how: [{"labels": runs[0][i]["labels"], "test_top1": statistics.mean(run[i]["test_top1"] for run in runs)}
                     for i in range(len(runs[0]))] for how, runs in curves.items()}  # fmt: skip
    return {"cub100": {"mean": summary, "seeds": curves, "start_per_class": 5, "per_round": 100}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["audit", "semi", "noisy", "suggest", "pretrain"],
                   choices=["audit", "semi", "noisy", "suggest", "pretrain"])  # fmt: skip
    p.add_argument("--pretrain-epochs", type=int, default=1, help="SimSiam epochs of the pretrain part (1)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--label-fraction", type=float, default=0.3, help="labels kept per class in the semi part (0.3)")
    p.add_argument("--semi-datasets", nargs="+", default=["cub100", "plantvillage_tomato"],
                   choices=["cub100", "plantvillage_tomato"])  # fmt: skip
    p.add_argument("--semi-settings", nargs="+", choices=list(SEMI_SETTINGS),
                   default=["labels_only", "with_unlabeled", "full_labels", "noisy_student_hard"])  # fmt: skip
    p.add_argument(
        "--budget",
        type=float,
        help="semi part: train each run with --budget MINUTES (the recipe's "
        "fine-tuning), written as semi_supervised_budget; default: every default, as semi_supervised",
    )
    p.add_argument("--cache-dir", default=default_cache_dir())
    p.add_argument("--work-dir")
    p.add_argument("--out", default="benchmarks/results/labels.json")
    args = p.parse_args()
    students = [k for k in args.semi_settings if "teachers" in SEMI_SETTINGS[k][2]]
    if not args.budget and "semi" in args.parts and students:
        print(f"semi: {', '.join(students)} left out: the noisy student's teacher is a fine-tuned run (add --budget)")
        args.semi_settings = [k for k in args.semi_settings if k not in students]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fg-labels-"))
    out = Path(args.out)
    results = {k: v for k, v in json.loads(out.read_text()).items() if k != "machine"} if out.is_file() else {}
    index = load_dataset(DATASETS["cub100"], val_fraction=0.0)
    pair = nearest_class(index, args.cache_dir) if {"audit", "noisy"} & set(args.parts) else None
    parts = {"audit": lambda: audit_part(args, work, index, pair), "semi": lambda: semi_part(args, work),
             "noisy": lambda: noisy_part(args, work, index, pair), "suggest": lambda: suggest_part(args),
             "pretrain": lambda: pretrain_part(args, work)}  # fmt: skip
    keys = {"audit": "audit", "semi": "semi_supervised", "noisy": "noisy_labels", "suggest": "suggest",
            "pretrain": "pretrain"}  # fmt: skip
    for part in args.parts:
        key = keys[part] + ("_budget" if part == "semi" and args.budget else "")
        new = parts[part]() | ({"budget_min": args.budget} if key == "semi_supervised_budget" else {})
        results[key] = results.get(key, {}) | new  # per dataset: a part run on one dataset keeps the others
        results[key]["seeds_run"] = args.seeds
        write_json(out, results)  # after every part: a stopped run keeps what it finished


if __name__ == "__main__":
    main()
