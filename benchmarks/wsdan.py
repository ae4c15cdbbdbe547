"""WS-DAN beside the baseline on cub100 (no part annotations there, so the weakly supervised method), same budget.

Budget, for both: frozen ImageNet lite0 at 224 px, images decoded and augmented every epoch, ``--epochs`` epochs
at lr ``--lr`` from a fresh head (the budget of benchmarks/ablation.py, whose baseline rows it can reuse);
WS-DAN trains its attention maps and classifier, with attention crop/drop views and center loss, and predicts
with its test-time crop. Reports test top-1, mean per-class accuracy, training time and batch-1 latency (both
measured in this run), writes JSON, and draws attention maps and crop boxes on test photos.

    python benchmarks/wsdan.py --seeds 0 --picture docs/images/wsdan_attention.jpg
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from _results import write_json
from _timing import latency_ms
from PIL import Image, ImageDraw

from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig
from finegrain.data.loading import open_image
from finegrain.engine.train import fit
from finegrain.explain.render import overlay
from finegrain.predict import Predictor
from finegrain.report.evaluation import evaluate_checkpoint


def _norm(a: torch.Tensor, size) -> np.ndarray:
    """An attention map at the input's size, scaled to [0, 1]."""
    a = torch.nn.functional.interpolate(a[None, None], size=size, mode="bilinear")[0, 0]
    return (a / a.max().clamp(min=1e-12)).numpy()


@torch.no_grad()
def picture(ckpt: Path, out: Path, count: int = 4, maps: int = 3) -> None:
    """One row per test photo: the mean attention map with the test-time crop box, then the ``maps`` attention
    maps with the most mass on that photo."""
    record = Checkpoint.load(ckpt)
    model = record.build_model().eval()
    predictor = Predictor.load(ckpt)
    test = record.dataset().split("test")
    rows = []
    for s in test[:: max(1, len(test) // count)][:count]:
        img = open_image(s.path)
        x = predictor.transform(img)[None]
        att = model.attention_maps(x)[0]
        box = model.attention_boxes(x)[0][0].tolist()
        size = x.shape[-2:]
        tiles = [overlay(img, _norm(att.mean(0), size), predictor.preprocess, boxes=[box], max_side=240)]
        for m in att.sum((1, 2)).argsort(descending=True)[:maps]:
            tile = overlay(img, _norm(att[m], size), predictor.preprocess, max_side=240)
            ImageDraw.Draw(tile).text((6, 4), f"map {int(m)}", fill="white")
            tiles.append(tile)
        rows.append(tiles)
    w, h = max(t.width for r in rows for t in r), max(t.height for r in rows for t in r)
    sheet = Image.new("RGB", (w * len(rows[0]), h * len(rows)), "white")
    for i, r in enumerate(rows):
        for j, t in enumerate(r):
            sheet.paste(t, (w * j, h * i))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, quality=85)
    print(f"written {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=TrainConfig().dataset.data)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--num-maps", type=int, default=32)
    p.add_argument("--reuse", default="runs/bench_ablation", help="ablation work dir whose baseline runs to reuse")
    p.add_argument("--work-dir", default="runs/bench_wsdan")
    p.add_argument("--picture", default="docs/images/wsdan_attention.jpg")
    p.add_argument("--out", default="benchmarks/results/wsdan_cub100.json")
    p.add_argument("--latency-only", action="store_true", help="re-time the runs in --out (on an idle machine)")
    args = p.parse_args()
    if args.latency_only:
        saved = json.loads(Path(args.out).read_text())
        for r in saved["rows"]:
            r["latency_ms"] = latency_ms(Predictor.load(Path(r["run_dir"]) / "last.pt", device="cpu"))
            print(f"{r['method']} seed {r['seed']}: batch-1 {r['latency_ms']:.1f} ms")
        write_json(args.out, saved)
        return

    rows = []
    for seed in args.seeds:
        for method in ("baseline", "wsdan"):
            run_dir = Path(args.work_dir) / f"{method}_seed{seed}"
            reused = Path(args.reuse) / f"baseline_seed{seed}"
            seconds = None
            if method == "baseline" and (reused / "last.pt").is_file():
                run_dir = reused  # the same budget, already trained by benchmarks/ablation.py
            else:
                kwargs = {"num_maps": args.num_maps} if method == "wsdan" else {}
                cfg = TrainConfig().replace(
                    data=args.data, method=method, model_kwargs=kwargs, seed=seed, epochs=args.epochs, lr=args.lr,
                    cache_features=False, run_dir=str(run_dir),
                )  # fmt: skip
                start = time.perf_counter()
                fit(cfg)
                seconds = time.perf_counter() - start
            r = evaluate_checkpoint(run_dir / "last.pt", out_dir=run_dir)
            lat = latency_ms(Predictor.load(run_dir / "last.pt", device="cpu"))
            rows.append({"method": method, "seed": seed, "top1": r["top1"], "mean_class_acc": r["mean_class_acc"],
                         "train_seconds": seconds, "latency_ms": lat, "run_dir": str(run_dir)})  # fmt: skip
            print(f"{method} seed {seed}: top-1 {100 * r['top1']:.2f}%  batch-1 {lat:.1f} ms", flush=True)

    print(f"\n{'method':10s} {'top-1':>7s} {'per-class':>9s} {'train s':>8s} {'ms/img':>7s}")
    for r in rows:
        t = f"{r['train_seconds']:.0f}" if r["train_seconds"] else "reused"
        print(
            f"{r['method']:10s} {100 * r['top1']:7.2f} {100 * r['mean_class_acc']:9.2f} {t:>8s} {r['latency_ms']:7.1f}"
        )
    meta = {"date": time.strftime("%Y-%m-%d"), "epochs": args.epochs, "lr": args.lr, "num_maps": args.num_maps,
            "budget": "frozen lite0 224 px, head/attention from scratch, images every epoch"}  # fmt: skip
    write_json(args.out, {"meta": meta, "rows": rows})
    if args.picture:
        picture(Path(rows[-1]["run_dir"]) / "last.pt", Path(args.picture))


if __name__ == "__main__":
    main()
