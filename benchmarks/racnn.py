"""RA-CNN beside the baseline on cub100: same ImageNet backbone (lite0), same 224-px input, same budget.

Trains (or reuses, with ``--baseline-run``) the default baseline and trains RA-CNN (2 scales, shared backbone),
evaluates both on the test split, times batch-1 latency of both in this run, prints a table, writes JSON, and
draws RA-CNN's zoom boxes with Grad-CAM on a few test photos. By default the backbone stays frozen (the
classifiers and APNs learn); ``--fine-tune`` starts both RA-CNN and a second baseline from the baseline run and
fine-tunes the whole network of each for the same epochs at the same learning rate (the paper's setting).

    python benchmarks/racnn.py --baseline-run runs/default --epochs 6 --out benchmarks/results/racnn_cub100.json
    python benchmarks/racnn.py --baseline-run runs/default --fine-tune --epochs 3 --lr 1e-4 \
        --work-dir runs/bench_racnn_ft --out benchmarks/results/racnn_ft_cub100.json
    python benchmarks/racnn.py --baseline-run runs/default --fine-tune --epochs 3 --lr 1e-4 --input-size 448 \
        --scale-size 224 --work-dir runs/bench_racnn_448 --out benchmarks/results/racnn_448_cub100.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _results import write_json
from _timing import latency_ms
from PIL import Image

from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig
from finegrain.data.loading import open_image
from finegrain.engine.train import fit
from finegrain.explain import explain
from finegrain.predict import Predictor
from finegrain.report.evaluation import evaluate_checkpoint


def picture(run: Path, out: Path, count: int = 6) -> None:
    predictor = Predictor.load(run / "best.pt")
    test = Checkpoint.load(run / "best.pt").dataset().split("test")
    chosen = test[:: max(1, len(test) // count)][:count]
    images = [open_image(s.path) for s in chosen]
    tiles = [e.overlay(img, predictor) for e, img in zip(explain(predictor, images), images, strict=True)]
    tiles = [t.resize((300, round(300 * t.height / t.width))) for t in tiles]
    height = max(t.height for t in tiles)
    sheet = Image.new("RGB", (300 * 3, height * ((len(tiles) + 2) // 3)), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, (300 * (i % 3), height * (i // 3)))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, quality=85)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=TrainConfig().dataset.data)
    p.add_argument("--baseline-run", help="a trained default baseline run to reuse (else one is trained)")
    p.add_argument("--epochs", type=int, default=6, help="RA-CNN epochs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scales", type=int, default=2)
    p.add_argument("--init-from-baseline", action="store_true", help="start RA-CNN from the baseline run")
    p.add_argument("--fine-tune", action="store_true", help="fine-tune RA-CNN and the baseline from the baseline run")
    p.add_argument("--input-size", type=int, help="input size of RA-CNN and the fine-tuned baseline (default: 224)")
    p.add_argument("--scale-size", type=int, help="RA-CNN's per-scale size; zooms crop the larger input")
    p.add_argument("--apn-start", type=int, default=200, help="classification-only steps before APN steps")
    p.add_argument("--work-dir", default="runs/bench_racnn")
    p.add_argument("--picture", default="docs/images/racnn_boxes.jpg")
    p.add_argument("--out", default="benchmarks/results/racnn_cub100.json")
    args = p.parse_args()
    work = Path(args.work_dir)

    runs = {}
    start = time.perf_counter()
    if args.baseline_run:
        runs["baseline"], baseline_seconds = Path(args.baseline_run), None
    else:
        runs["baseline"] = fit(TrainConfig().replace(data=args.data, run_dir=str(work / "baseline"))).run_dir
        baseline_seconds = time.perf_counter() - start
    init = str(runs["baseline"] / "best.pt") if args.init_from_baseline or args.fine_tune else None
    tuned = {"freeze_backbone": False} if args.fine_tune else {}
    seconds = {"baseline": baseline_seconds}
    racnn_kwargs = {"scales": args.scales, "apn_start": args.apn_start, "scale_size": args.scale_size}
    jobs = {"racnn": {"method": "racnn", "model_kwargs": racnn_kwargs}}
    if args.fine_tune:
        jobs = {"baseline fine-tuned": {}, **jobs}
    for name, job in jobs.items():
        start = time.perf_counter()
        cfg = TrainConfig().replace(
            data=args.data, epochs=args.epochs, lr=args.lr, run_dir=str(work / name.replace(" ", "_")),
            init_from=init, cache_features=False, input_size=args.input_size, **tuned, **job,
        )  # fmt: skip
        runs[name] = fit(cfg).run_dir
        seconds[name] = time.perf_counter() - start

    rows = []
    for name, run in runs.items():
        r = evaluate_checkpoint(run, out_dir=work / f"eval_{name.replace(' ', '_')}")
        predictor = Predictor.load(run / "best.pt", device="cpu")
        rows.append({
            "method": name, "run": str(run), "top1": r["top1"], "top5": r["top5"],
            "mean_class_acc": r["mean_class_acc"], "train_seconds": seconds[name],
            "latency_b1_ms": latency_ms(predictor),
        })  # fmt: skip
    print(f"{'method':20s} {'top-1':>7s} {'top-5':>7s} {'per-class':>9s} {'train s':>8s} {'b1 ms':>7s}")
    for r in rows:
        train = f"{r['train_seconds']:.0f}" if r["train_seconds"] else "reused"
        print(f"{r['method']:20s} {100 * r['top1']:7.2f} {100 * r['top5']:7.2f} {100 * r['mean_class_acc']:9.2f} "
              f"{train:>8s} {r['latency_b1_ms']:7.1f}")  # fmt: skip
    picture(runs["racnn"], Path(args.picture))
    meta = {"date": time.strftime("%Y-%m-%d"), "data": args.data, "epochs": args.epochs, "lr": args.lr,
            "scales": args.scales, "init_from_baseline": args.init_from_baseline or args.fine_tune,
            "fine_tune": args.fine_tune, "apn_start": args.apn_start, "input_size": args.input_size,
            "scale_size": args.scale_size,
            "threads": torch.get_num_threads()}  # fmt: skip
    write_json(args.out, {"meta": meta, "rows": rows})
    print(f"picture: {args.picture}")


if __name__ == "__main__":
    main()
