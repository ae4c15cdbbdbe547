"""Partial fine-tuning on cached maps (``--train-stages``) from the recipe's head: validation top-1 per epoch and the
seconds it took, for each cut and learning rate, one dataset and seed. Choices read validation only.

Each variant is ``finegrain.train`` from the head checkpoint with ``--no-freeze-backbone --train-stages K``; runs
with the same cut reuse the maps cached by the first (engine/map_task.py), so the first run of each cut pays for the
cache (its seconds say so).

    python benchmarks/partial_finetune.py --data cub100 --stages 2 3 --lrs 2e-4 1e-3 --epochs 6 \\
        --out benchmarks/results/partial_finetune_cub100.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig
from finegrain.engine.recipe import head_config
from finegrain.engine.train import fit

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from peer_timm import DATASETS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="cub100", choices=sorted(DATASETS))
    p.add_argument("--head", default=None, help="the head checkpoint to start from (default: fit the recipe's head)")
    p.add_argument("--stages", type=int, nargs="+", default=[2])
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 1e-3])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/finegrain_partial")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work = Path(args.work) / args.data
    base = TrainConfig().replace(data=str(DATASETS[args.data]), seed=args.seed, cache_dir=str(work / "cache"))
    head = args.head
    if head is None:
        start = time.perf_counter()
        head = str(fit(head_config(base, work / "head")).run_dir / "best.pt")
        print(f"head: {time.perf_counter() - start:.0f} s")
    head_val = Checkpoint.load(head).metrics.get("val_top1")
    rows = []
    for k in args.stages:
        for lr in args.lrs:
            cfg = base.replace(init_from=head, freeze_backbone=False, train_stages=k, map_views=args.views,
                               epochs=args.epochs, lr=lr, warmup_epochs=min(1.0, 0.25 * args.epochs),
                               run_dir=str(work / f"stages{k}_lr{lr:g}"))  # fmt: skip
            start = time.perf_counter()
            result = fit(cfg)
            seconds = time.perf_counter() - start
            curve = [round(100 * r["val_top1"], 2) for r in result.history]
            epoch_s = [round(r["epoch_seconds"], 1) for r in result.history]
            rows.append({"train_stages": k, "lr": lr, "val_top1": curve, "epoch_s": epoch_s, "seconds": round(seconds)})
            print(f"stages {k} lr {lr:g}: val {curve} (head {100 * head_val:.2f}); {seconds:.0f} s, epochs {epoch_s}")
    print(f"{'stages':>6} {'lr':>8} {'best val':>9} {'last val':>9} {'head val':>9} {'s/epoch':>8} {'total s':>8}")
    for r in rows:
        print(f"{r['train_stages']:>6} {r['lr']:>8g} {max(r['val_top1']):>9.2f} {r['val_top1'][-1]:>9.2f} "
              f"{100 * head_val:>9.2f} {min(r['epoch_s']):>8.1f} {r['seconds']:>8}")  # fmt: skip
    if args.out:
        write_json(args.out, {"data": args.data, "seed": args.seed, "head": head, "head_val_top1": head_val,
                              "views": args.views, "epochs": args.epochs, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
