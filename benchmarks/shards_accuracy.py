"""Does training from shards give the same model as training from the dataset's files? The same seed, the same
split, trained both ways (the frozen head, then the recipe's fine-tuning stage for ``--epochs``), each evaluated on
the test split. Issue 20 asks for the same test top-1 within 0.3 pt.

    python benchmarks/shards_accuracy.py --data ../shared/data/cub100 --epochs 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig
from finegrain.data import load_dataset
from finegrain.data.shards import write_shards
from finegrain.engine.recipe import finetune_config
from finegrain.engine.train import fit
from finegrain.report.evaluation import evaluate_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from peer_timm import DATASETS  # noqa: E402


def train_and_test(cfg: TrainConfig, epochs: int, run_dir: Path) -> dict:
    start = time.perf_counter()
    head = fit(cfg.replace(run_dir=str(run_dir / "head")))
    head_best = Checkpoint.load(head.run_dir / "best.pt")
    frozen = evaluate_checkpoint(head_best.path, workers=cfg.speed.workers)
    tuned = fit(finetune_config(cfg, head_best, epochs, run_dir / "finetune"))
    finetuned = evaluate_checkpoint(tuned.run_dir / "best.pt", workers=cfg.speed.workers)
    keys = ("top1", "mean_class_acc", "n")
    return {"frozen": {k: frozen[k] for k in keys}, "finetuned": {k: finetuned[k] for k in keys},
            "seconds": time.perf_counter() - start}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATASETS["cub100"]))
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs after the head (2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--work-dir", default=tempfile.mkdtemp(prefix="fg-shards-acc-"))
    p.add_argument("--out", default="benchmarks/results/shards_accuracy.json")
    args = p.parse_args()
    work, cfg = Path(args.work_dir), TrainConfig().replace(seed=args.seed)
    shards = work / "shards"
    index = load_dataset(args.data, val_fraction=cfg.dataset.val_fraction, seed=args.seed)  # the split train makes
    write_shards(index, shards, args.shard_size)
    results = {name: train_and_test(cfg.replace(data=data), args.epochs, work / name)
               for name, data in (("files", args.data), ("shards", str(shards)))}  # fmt: skip
    diff = {stage: round(100 * abs(results["files"][stage]["top1"] - results["shards"][stage]["top1"]), 2)
            for stage in ("frozen", "finetuned")}  # fmt: skip
    print(f"{'source':8} {'frozen top-1':>13} {'fine-tuned top-1':>17}")
    for name, r in results.items():
        print(f"{name:8} {100 * r['frozen']['top1']:13.2f} {100 * r['finetuned']['top1']:17.2f}")
    print(f"difference (pt): frozen {diff['frozen']}, fine-tuned {diff['finetuned']}")
    write_json(args.out, {"data": args.data, "epochs": args.epochs, "seed": args.seed, "results": results,
                          "difference_pt": diff, "within_0_3_pt": all(v <= 0.3 for v in diff.values()),
                          "command": " ".join(sys.argv)})  # fmt: skip


if __name__ == "__main__":
    main()
