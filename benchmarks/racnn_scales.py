"""Per-scale top-1 of trained RA-CNN runs: each scale alone and the fused logits, on validation and test.

Says whether the zoomed scale helps the fusion, the question behind `fuse` (choose it on validation).

    python benchmarks/racnn_scales.py runs/bench_racnn_ft/racnn runs/bench_racnn_448/racnn \
        --out benchmarks/results/racnn_scales_cub100.json
"""

from __future__ import annotations

import argparse
import time

import torch
from _results import write_json

from finegrain.checkpoint import Checkpoint
from finegrain.data import ImageDataset
from finegrain.data.transforms import eval_transform


@torch.inference_mode()
def scale_accuracy(run: str, split: str) -> dict:
    ckpt = Checkpoint.load(run)
    model = ckpt.build_model().eval()
    transform = eval_transform(ckpt.preprocess)
    dataset = ImageDataset(ckpt.dataset().split(split), transform)
    correct, n = torch.zeros(model.scales + 1), 0
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=2):
        logits, _ = model.forward_scales(x)
        for s, lg in enumerate([*logits, model.fused(logits)]):
            correct[s] += (lg.argmax(1) == y).sum()
        n += len(y)
    acc = (correct / max(n, 1)).tolist()
    return {"images": n, **{f"scale{s + 1}": a for s, a in enumerate(acc[:-1])}, "fused": acc[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="RA-CNN run directories or checkpoints")
    p.add_argument("--splits", nargs="+", default=["val", "test"])
    p.add_argument("--out", default="benchmarks/results/racnn_scales.json")
    args = p.parse_args()
    rows = [{"run": run, "split": split, **scale_accuracy(run, split)} for run in args.runs for split in args.splits]
    for r in rows:
        scales = " ".join(f"{k} {100 * v:6.2f}" for k, v in r.items() if k.startswith("scale") or k == "fused")
        print(f"{r['run']:32s} {r['split']:5s} n={r['images']:5d} {scales}")
    write_json(args.out, {"meta": {"date": time.strftime("%Y-%m-%d")}, "rows": rows})


if __name__ == "__main__":
    main()
