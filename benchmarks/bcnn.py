"""Benchmark: baseline vs B-CNN vs compact B-CNN on the same frozen backbone, input size, epochs and budget.

Every method trains its head on cached backbone features for the same number of epochs; the learning rate
of each is chosen on the validation split (carved from the training images) from the same small grid, and
only the chosen run is evaluated on the test split. Prints a table and writes JSON.

    python benchmarks/bcnn.py --data ../shared/data/cub100 --out benchmarks/results/bcnn_cub100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig
from finegrain.engine.train import fit
from finegrain.report.evaluation import evaluate_checkpoint

METHODS = {
    "baseline": ("baseline", {}),
    "bcnn": ("bcnn", {"reduce_dim": 256}),
    "cbcnn": ("cbcnn", {"reduce_dim": 256, "sketch_dim": 8192, "pooling": "tensor_sketch"}),
}


def latency_ms(model: torch.nn.Module, size: int, runs: int = 30) -> float:
    """Median batch-1 CPU latency, fp32, channels-last (as finegrain predicts)."""
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, size, size).to(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(runs + 5):
            start = time.perf_counter()
            model(x)
            if i >= 5:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cub100")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache-dir", default=None, help="feature cache (default: finegrain's)")
    p.add_argument("--out", default="benchmarks/results/bcnn.json")
    p.add_argument("--work-dir", help="run directories; finished runs found there are reused, not retrained")
    p.add_argument("--append", action="store_true", help="keep the other methods' rows already in --out")
    args = p.parse_args()

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="fg-bench-bcnn-"))
    rows = []
    for name in args.methods:
        method, kwargs = METHODS[name]
        trials = []
        for lr in args.lrs:
            cfg = TrainConfig().replace(
                data=args.data, method=method, model_kwargs=kwargs, epochs=args.epochs, lr=lr,
                input_size=args.input_size, workers=args.workers, run_dir=str(work / f"{name}-lr{lr:g}"),
            )  # fmt: skip
            if args.cache_dir:
                cfg = cfg.replace(cache_dir=args.cache_dir)
            metrics = Path(cfg.run.run_dir) / "metrics.jsonl"
            history = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
            seconds = None  # unknown for a reused run
            if len(history) < cfg.optim.epochs:
                start = time.perf_counter()
                history = fit(cfg).history
                seconds = time.perf_counter() - start
            best_val = max(r["val_top1"] for r in history)
            head = sum(r["epoch_seconds"] for r in history)  # the feature cache may be warm or cold
            trials.append({"lr": lr, "val_top1": best_val, "train_seconds": seconds, "head_seconds": head,
                           "run_dir": cfg.run.run_dir})  # fmt: skip
        chosen = max(trials, key=lambda t: t["val_top1"])
        test = evaluate_checkpoint(Path(chosen["run_dir"]) / "best.pt", workers=args.workers)
        model = Checkpoint.load(Path(chosen["run_dir"]) / "best.pt").build_model()
        rows.append(
            {
                "method": name,
                "model_kwargs": kwargs,
                "lr": chosen["lr"],
                "val_top1": chosen["val_top1"],
                "top1": test["top1"],
                "top5": test["top5"],
                "mean_class_acc": test["mean_class_acc"],
                "train_seconds": chosen["train_seconds"],
                "head_seconds": chosen["head_seconds"],
                "params": sum(p.numel() for p in model.parameters()),
                "head_params": sum(p.numel() for p in model.head.parameters()),
                "descriptor_dim": getattr(model, "descriptor_dim", model.backbone.num_features),
                "latency_ms_b1": latency_ms(model, args.input_size),
                "trials": trials,
            }
        )

    out = Path(args.out)
    if args.append and out.is_file():
        mine = {r["method"] for r in rows}
        rows = [r for r in json.loads(out.read_text())["rows"] if r["method"] not in mine] + rows
    columns = [("method", 10), ("lr", 7), ("val", 6), ("top-1", 6), ("mpc", 6), ("head s", 8), ("params", 10)]
    columns += [("desc", 7), ("ms/img", 7)]
    print(" ".join(f"{n:<{w}s}" if n == "method" else f"{n:>{w}s}" for n, w in columns))
    for r in rows:
        print(
            f"{r['method']:10s} {r['lr']:7.0e} {100 * r['val_top1']:6.2f} {100 * r['top1']:6.2f} "
            f"{100 * r['mean_class_acc']:6.2f} {r['head_seconds']:8.0f} {r['params']:10,d} "
            f"{r['descriptor_dim']:7d} {r['latency_ms_b1']:7.1f}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "epochs": args.epochs, "input_size": args.input_size,
            "machine": f"{torch.get_num_threads()} CPU threads", "torch": torch.__version__}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
