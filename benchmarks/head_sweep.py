"""Validation sweep behind the default recipe: head options on a frozen backbone, chosen on validation only.

Each variant is a real `finegrain train` run (cached features, so each takes seconds once the cache is warm);
the test split is not touched. Prints a table and writes JSON.

    python benchmarks/head_sweep.py --data ../shared/data/cub100 --out benchmarks/results/head_sweep_cub100.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _results import write_json

from finegrain.config import TrainConfig
from finegrain.engine.train import fit

VARIANTS = {
    "default (lr 1e-3, wd 0.05, 30 ep, mirrored, bf16 features)": {},
    "no mirrored features": {"feature_flip": False},
    "fp32 features": {"amp": "none"},
    "lr 3e-3": {"lr": 3e-3},
    "lr 3e-4, 60 epochs": {"lr": 3e-4, "epochs": 60},
    "weight decay 0.5": {"weight_decay": 0.5},
    "no label smoothing": {"label_smoothing": 0.0},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cub100")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="benchmarks/results/head_sweep.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fg-head-sweep-"))
    rows = []
    for name, overrides in VARIANTS.items():
        scores = []
        for seed in args.seeds:
            # The seed changes the validation split (carved with it), the head initialisation and data order.
            cfg = TrainConfig().replace(
                data=args.data, run_dir=str(work / f"{len(rows)}-{seed}"), seed=seed, **overrides
            )
            start = time.perf_counter()
            result = fit(cfg)
            scores.append((result.history[-1]["val_top1"], time.perf_counter() - start))
        vals = torch.tensor([s[0] for s in scores])
        rows.append({"variant": name, "overrides": overrides, "val_top1_mean": vals.mean().item(),
                     "val_top1_std": vals.std().item() if len(vals) > 1 else 0.0, "val_top1": vals.tolist(),
                     "seconds": [s[1] for s in scores]})  # fmt: skip
    print(f"{'variant':62s} {'val top-1 (mean ± std over seeds)':>34s}")
    for r in rows:
        print(f"{r['variant']:62s} {100 * r['val_top1_mean']:27.2f} ± {100 * r['val_top1_std']:.2f}")
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "seeds": args.seeds, "rows": rows})


if __name__ == "__main__":
    main()
