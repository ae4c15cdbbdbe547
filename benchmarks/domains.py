"""finegrain on four domains (birds, flowers, crop disease, traffic signs), side by side with the textbook probe and
the peer (timm's own training script), in one run on one machine.

Per dataset and seed:
- ``finegrain_default``: ``finegrain train`` with every default, then ``finegrain evaluate`` (test split);
- ``finegrain_budget``: ``finegrain train --budget MINUTES`` (probe, then fine-tuning for what the budget allows), from
  a cold feature cache, so its wall time is a first run's;
- ``probe``: the textbook probe: scikit-learn ``LogisticRegression`` on L2-normalised frozen lite0 features of the
  centre crop (crop 0.875, no flips), C chosen on finegrain's validation split;
- ``timm_peer``: ``../shared/peers/timm_train.py`` fine-tuning the same ImageNet lite0 at 224 px, given the wall time
  ``finegrain_budget`` took (epochs from this machine's measured throughput; benchmarks/peer_timm.py).

``--parts`` picks which of them run (the budget recipe and the peer cost minutes per dataset each). Test splits
give the reported numbers only; every choice inside (C, head, epochs) is made on validation splits.

    python benchmarks/domains.py --parts default probe --seeds 0 --out benchmarks/results/domains.json
    python benchmarks/domains.py --parts default probe budget peer --budget 10 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from finegrain.config import TrainConfig, default_cache_dir
from finegrain.data import load_dataset
from finegrain.engine.features import extract_features
from finegrain.engine.recipe import train_within_budget
from finegrain.engine.train import fit
from finegrain.models import create_model
from finegrain.report.evaluation import evaluate_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from peer_timm import DATASETS, build_tree, lite0_timm_weights, run_peer, train_throughput  # noqa: E402

PROBE_C = (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300)


def finegrain_run(data: Path, run_dir: Path, seed: int, **options) -> dict:
    start = time.perf_counter()
    cfg = TrainConfig().replace(data=str(data), run_dir=str(run_dir), seed=seed, **options)
    (train_within_budget if cfg.recipe.budget else fit)(cfg)
    train_s = time.perf_counter() - start
    r = evaluate_checkpoint(run_dir / "best.pt", workers=2)
    recipe = run_dir / "recipe.json"
    return {"top1": 100 * r["top1"], "mean_class": 100 * r["mean_class_acc"], "train_s": round(train_s, 1),
            "recipe": json.loads(recipe.read_text()) if recipe.is_file() else None}  # fmt: skip


def textbook_probe(data: Path, seed: int, cache_dir: str) -> dict:
    """scikit-learn logistic regression on L2-normalised centre-crop features; C on validation."""
    from sklearn.linear_model import LogisticRegression  # the reference implementation, a dev dependency

    start = time.perf_counter()
    index = load_dataset(data, val_fraction=0.1, test_fraction=0.2, seed=seed)
    model = create_model("baseline", num_classes=len(index.classes)).eval()
    pre = replace(model.preprocess, crop_pct=0.875)
    feats, labels = {}, {}
    for split in ("train", "val", "test"):
        x = extract_features(model, index.split(split), pre, torch.device("cpu"), amp="auto", channels_last=True,
                             cache_dir=cache_dir, desc=split)  # fmt: skip
        feats[split] = torch.nn.functional.normalize(x, dim=1).numpy()
        labels[split] = np.array([s.label for s in index.split(split)])
    sweep = []
    for c in PROBE_C:  # one BLAS thread, as finegrain fits: the thread count moves where L-BFGS stops (see above)
        with threadpool_limits(limits=1):
            clf = LogisticRegression(C=c, max_iter=2000).fit(feats["train"], labels["train"])
        sweep.append((clf.score(feats["val"], labels["val"]), -c, clf))
    val, neg_c, clf = max(sweep, key=lambda t: t[:2])
    pred = clf.predict(feats["test"])
    per_class = [float((pred[labels["test"] == k] == k).mean()) for k in np.unique(labels["test"])]
    return {"top1": 100 * float((pred == labels["test"]).mean()), "mean_class": 100 * statistics.mean(per_class),
            "train_s": round(time.perf_counter() - start, 1), "C": -neg_c, "val_top1": 100 * val}  # fmt: skip


def peer(name: str, work: Path, seconds: float, seed: int, img_s: float) -> dict:
    root, _, n_train = build_tree(name, work, seed)
    epochs = max(1, round(seconds * img_s / n_train))
    r = run_peer(name, work, epochs, seed, lite0_timm_weights(work))
    return {"top1": r["top1"], "mean_class": None, "train_s": r["train_s"], "epochs": epochs, "curve": r["curve"]}


def summary(runs: list[dict]) -> dict:
    tops = [r["top1"] for r in runs]
    return {"top1": statistics.mean(tops), "top1_sd": statistics.stdev(tops) if len(tops) > 1 else None,
            "mean_class": statistics.mean(r["mean_class"] for r in runs) if runs[0]["mean_class"] is not None else None,
            "train_s": statistics.mean(r["train_s"] for r in runs), "seeds": runs}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--parts", nargs="+", default=["default", "probe"], choices=["default", "probe", "budget", "peer"])
    p.add_argument("--budget", type=float, default=10.0, help="minutes for finegrain's budgeted recipe (10)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--work-dir", help="run folders (default: a new temporary folder)")
    p.add_argument("--cache-dir", default=default_cache_dir())
    p.add_argument("--out", default="benchmarks/results/domains.json")
    args = p.parse_args()

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fg-domains-"))
    img_s = train_throughput() if "peer" in args.parts else None
    runs: dict[str, dict[str, list]] = {name: {} for name in args.datasets}
    results: dict = {}

    def record(name: str, part: str, row: dict) -> None:  # saved after every part: a stopped run keeps what it did
        runs[name].setdefault(part, []).append(row)
        results[name] = {k: summary(v) for k, v in runs[name].items()}
        write_json(args.out, {"parts": args.parts, "budget_min": args.budget, "seeds": args.seeds,
                              "peer_train_img_s": img_s, "started": started, "datasets": results})  # fmt: skip

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    for seed in args.seeds:  # seed-major: every dataset has a first seed before any has a second
        for name in args.datasets:
            data = DATASETS[name]
            if "default" in args.parts:
                record(name, "finegrain_default", finegrain_run(data, work / name / f"default{seed}", seed))
            if "probe" in args.parts:
                record(name, "probe", textbook_probe(data, seed, args.cache_dir))
            if "budget" in args.parts:
                run_dir = work / name / f"budget{seed}"  # a cold feature cache: the wall time of a first run
                record(name, "finegrain_budget", finegrain_run(data, run_dir, seed, budget=args.budget,
                                                               cache_dir=str(run_dir / "cache")))  # fmt: skip
            if "peer" in args.parts:
                budget_runs = runs[name].get("finegrain_budget")
                seconds = budget_runs[-1]["train_s"] if budget_runs else args.budget * 60
                record(name, "timm_peer", peer(name, work / "peer", seconds, seed, img_s))
    print(
        f"{'dataset':22s}"
        + "".join(f"{k:>20s}" for k in ("finegrain_default", "finegrain_budget", "probe", "timm_peer"))
    )
    for name, r in results.items():
        cells = []
        for k in ("finegrain_default", "finegrain_budget", "probe", "timm_peer"):
            if k not in r:
                cells.append(f"{'-':>20s}")
                continue
            sd = f" ±{r[k]['top1_sd']:.1f}" if r[k]["top1_sd"] is not None else ""
            cells.append(f"{r[k]['top1']:>14.2f}{sd:>6s}")
        print(f"{name:22s}" + "".join(cells))


if __name__ == "__main__":
    main()
