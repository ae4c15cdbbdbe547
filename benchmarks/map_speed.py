"""What partial fine-tuning on cached maps saves per training image: training steps of the last K stages + head on
maps (``--train-stages K``) against whole-network fine-tuning on images, and the one-off cost of caching a view
(the frozen lower stages' forward pass), measured in one run, alternating, as ratios to whole fine-tuning.

Images are random tensors at the input size (no decoding: that cost is the same for a cached view and a
fine-tuning image, and the cache pays it once per view); the run's precision and layout are finegrain's defaults.

    python benchmarks/map_speed.py --out benchmarks/results/map_speed.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from finegrain.engine.evaluate import autocast
from finegrain.engine.setup import freeze_bn_stats
from finegrain.env import configure_threads, resolve_amp
from finegrain.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402


def train_rate(module: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str, steps: int) -> float:
    """Training images/s of ``module`` on batch ``x``: the fastest of ``steps`` steps after one warm-up."""
    module.train()
    freeze_bn_stats(module)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
    best = float("inf")
    for i in range(steps + 1):
        start = time.perf_counter()
        with autocast(x.device, amp):
            loss = nn.functional.cross_entropy(module(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            best = min(best, time.perf_counter() - start)
    return len(x) / best


@torch.inference_mode()
def cache_rate(lower: nn.Module, x: torch.Tensor, amp: str, steps: int) -> float:
    lower.eval()
    best = float("inf")
    for i in range(steps + 1):
        start = time.perf_counter()
        with autocast(x.device, amp):
            lower(x)
        if i:
            best = min(best, time.perf_counter() - start)
    return len(x) / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    configure_threads()
    amp = resolve_amp("auto", torch.device("cpu"))
    model = create_model("baseline", num_classes=100, backbone=args.backbone)
    size = model.preprocess.input_size
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (args.batch,))
    rates: dict[str, list[float]] = {"whole": []}
    shapes = {}
    for _ in range(args.rounds):  # alternating, so a change in the machine's load touches every variant alike
        model.requires_grad_(True)  # split_stages froze the lower stages of the shared model in the round before
        rates["whole"].append(train_rate(model, x, y, amp, args.steps))
        for k in args.stages:
            model.requires_grad_(True)  # a cut freezes its lower stages in the shared model: undo the last one's
            lower, upper = model.split_stages(k)
            with torch.inference_mode(), autocast(x.device, amp):
                maps = lower.eval()(x).float().contiguous(memory_format=torch.channels_last)
            shapes[k] = list(maps.shape[1:])
            rates.setdefault(f"stages_{k}", []).append(train_rate(upper, maps.clone(), y, amp, args.steps))
            rates.setdefault(f"cache_{k}", []).append(cache_rate(lower, x, amp, args.steps))
    whole = statistics.median(rates["whole"])
    rows = []
    print(f"{'variant':<12} {'map':<16} {'train img/s':>11} {'x whole':>8} {'cache img/s':>11}")
    print(f"{'whole':<12} {'-':<16} {whole:>11.1f} {1.0:>8.2f} {'-':>11}")
    for k in args.stages:
        train, cache = statistics.median(rates[f"stages_{k}"]), statistics.median(rates[f"cache_{k}"])
        rows.append({"train_stages": k, "map": shapes[k], "train_img_s": round(train, 1),
                     "speedup": round(train / whole, 2), "cache_img_s": round(cache, 1)})  # fmt: skip
        print(f"{f'stages {k}':<12} {str(shapes[k]):<16} {train:>11.1f} {train / whole:>8.2f} {cache:>11.1f}")
    if args.out:
        write_json(args.out, {"backbone": args.backbone, "input_size": size, "batch": args.batch, "precision": amp,
                              "whole_img_s": round(whole, 1), "rates": rates, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
