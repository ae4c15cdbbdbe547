"""What running the large depthwise convolutions in fp32 buys a bf16 training step (``engine/depthwise.py``): the
recipe's own speed probe (``finetune_speed``) of lite0's last two stages on cached maps and of the whole network at
176 and 224 px, with and without it, alternating round by round, as images/s and ratios. Random tensors, fresh
models, finegrain's default precision and layout (bf16 only where native: elsewhere both rows are the same).

    python benchmarks/depthwise_precision.py --out benchmarks/results/depthwise_precision_<cpu>.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from finegrain.config import TrainConfig
from finegrain.cpu_load import busy_share
from finegrain.engine import depthwise
from finegrain.engine.recipe import finetune_speed
from finegrain.env import configure_threads, cpu_model, resolve_amp
from finegrain.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402

CASES = {"maps (last 2 stages)": (2, None), "whole, 176 px": (0, 176), "whole, 224 px": (0, 224)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    configure_threads()
    cpu, kernel = torch.device("cpu"), depthwise.MIN_KERNEL
    rates: dict[str, dict[str, list[float]]] = {case: {"bf16 all": [], "fp32 depthwise": []} for case in CASES}
    busy = []
    for _ in range(args.rounds):
        for case, (stages, size) in CASES.items():
            cfg = TrainConfig().replace(train_input_size=size)
            for variant in ("bf16 all", "fp32 depthwise"):
                depthwise.MIN_KERNEL = kernel if variant == "fp32 depthwise" else 10**6
                busy.append(busy_share(0.2) or 0.0)
                model = create_model("baseline", num_classes=100)
                rates[case][variant].append(finetune_speed(model, 100, cfg, cpu, args.steps, train_stages=stages))
    depthwise.MIN_KERNEL = kernel
    print(f"{'step':<22} {'bf16 all img/s':>15} {'fp32 depthwise':>15} {'ratio':>6}")
    rows = {}
    for case, r in rates.items():
        a, b = statistics.median(r["bf16 all"]), statistics.median(r["fp32 depthwise"])
        rows[case] = {"bf16_all_img_s": round(a, 1), "fp32_depthwise_img_s": round(b, 1), "ratio": round(b / a, 2)}
        print(f"{case:<22} {a:>15.1f} {b:>15.1f} {b / a:>6.2f}")
    print(f"precision {resolve_amp('auto', cpu)} on {cpu_model()}; CPUs busy before a probe (max): {max(busy):.2f}")
    if args.out:
        write_json(args.out, {"precision": resolve_amp("auto", cpu), "min_kernel": kernel, "rounds": args.rounds,
                              "busy_before_max": max(busy), "rates": rates, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
