"""What ``--compile`` (``torch.compile`` of the training step's model) buys a fine-tuning step on this machine: the
recipe's own speed probe (``finetune_speed``, which compiles the step's module when asked) of lite0's last two stages
on cached maps and of the whole network at 176 px, eager and compiled, alternating round by round, as images/s and
ratios, with the seconds the compiled probe spent in all (its compile is in the untimed warm-up step). Each round
starts from a fresh model and compiles cold: ``torch._dynamo.reset``, Inductor's graph caches off and its cache
folder (built kernels) a new empty one, as the first run on a machine does (with ``--warm-cache`` its caches stay
on, as for a later run on the same machine). Random tensors, finegrain's default precision and layout.

    python benchmarks/compile_speed.py --out benchmarks/results/compile_speed_<cpu>.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from finegrain.config import TrainConfig
from finegrain.cpu_load import busy_share
from finegrain.engine.recipe import finetune_speed
from finegrain.env import configure_threads, cpu_model, resolve_amp
from finegrain.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402

CASES = {"maps (last 2 stages)": (2, None), "whole, 176 px": (0, 176)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk compile caches on")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    configure_threads()
    torch._inductor.config.fx_graph_cache = args.warm_cache
    torch._functorch.config.enable_autograd_cache = args.warm_cache
    cpu = torch.device("cpu")
    rates = {case: {"eager": [], "compiled": []} for case in CASES}
    seconds = {case: [] for case in CASES}  # the compiled probe's whole call: compiling + warm-up + timed steps
    busy = []
    for _ in range(args.rounds):
        for case, (stages, size) in CASES.items():
            cfg = TrainConfig().replace(train_input_size=size)
            for variant in ("eager", "compiled"):
                torch._dynamo.reset()
                if not args.warm_cache:
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
                busy.append(busy_share(0.2) or 0.0)
                model = create_model("baseline", num_classes=100)
                start = time.perf_counter()
                rate = finetune_speed(model, 100, cfg, cpu, args.steps, train_stages=stages,
                                      compiled=variant == "compiled")  # fmt: skip
                rates[case][variant].append(rate)
                if variant == "compiled":
                    seconds[case].append(round(time.perf_counter() - start, 1))
    print(f"{'step':<22} {'eager img/s':>12} {'compiled':>9} {'ratio':>6} {'compiled probe s':>17}")
    rows = {}
    for case, r in rates.items():
        a, b = statistics.median(r["eager"]), statistics.median(r["compiled"])
        rows[case] = {"eager_img_s": round(a, 1), "compiled_img_s": round(b, 1), "ratio": round(b / a, 2),
                      "compiled_probe_s": seconds[case]}  # fmt: skip
        print(f"{case:<22} {a:>12.1f} {b:>9.1f} {b / a:>6.2f} {', '.join(map(str, seconds[case])):>17}")
    print(f"precision {resolve_amp('auto', cpu)} on {cpu_model()}; CPUs busy before a probe (max): {max(busy):.2f}")
    if args.out:
        write_json(args.out, {"precision": resolve_amp("auto", cpu), "rounds": args.rounds, "steps": args.steps,
                              "warm_cache": args.warm_cache, "busy_before_max": max(busy), "rates": rates,
                              "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
