"""What partial fine-tuning on cached maps saves per training image: training steps of the last K stages + head on
maps (``--train-stages K``) against whole-network fine-tuning on images, and the one-off cost of caching a view
(the frozen lower stages' forward pass), measured in one run, alternating, as ratios to whole fine-tuning.

Images are random tensors at the input size (no decoding: that cost is the same for a cached view and a
fine-tuning image, and the cache pays it once per view); the speeds are the recipe's own probes
(``finetune_speed``, ``cache_speed``), a fresh model each, at finegrain's default precision and layout.

    python benchmarks/map_speed.py --out benchmarks/results/map_speed.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from finegrain.config import TrainConfig
from finegrain.engine.map_task import map_shape
from finegrain.engine.recipe import cache_speed, finetune_speed
from finegrain.env import configure_threads, resolve_amp
from finegrain.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402


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
    cfg = TrainConfig().replace(backbone=args.backbone, batch_size=args.batch)  # finegrain's precision and layout
    cpu = torch.device("cpu")
    fresh = lambda: create_model("baseline", num_classes=100, backbone=args.backbone)  # noqa: E731 - a model per probe
    size, amp = fresh().preprocess.input_size, resolve_amp(cfg.speed.amp, cpu)
    rates: dict[str, list[float]] = {"whole": []}
    shapes = {k: list(map_shape(fresh().split_stages(k)[0], size, cpu)) for k in args.stages}
    for _ in range(args.rounds):  # alternating, so a change in the machine's load touches every variant alike
        rates["whole"].append(finetune_speed(fresh(), 100, cfg, cpu, steps=args.steps))
        for k in args.stages:
            rates.setdefault(f"stages_{k}", []).append(
                finetune_speed(fresh(), 100, cfg, cpu, args.steps, train_stages=k)
            )
            rates.setdefault(f"cache_{k}", []).append(cache_speed(fresh(), cfg, cpu, k, args.steps))
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
