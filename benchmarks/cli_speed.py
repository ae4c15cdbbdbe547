"""How long the command line takes to answer ``--help``: ``finegrain --help`` and ``finegrain train --help`` beside
a bare ``python -c pass`` (the interpreter's own start), run alternately in one run so a busy machine slows all three.

The library issue's targets: under 1.0 s and 1.5 s. The help texts come from ``finegrain.cli``, which imports no
PyTorch, timm or FastAPI (the handlers are looked up when a command runs).

    python benchmarks/cli_speed.py --runs 10 --out benchmarks/results/cli_speed.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from peer_timm import machine_cpu_s  # noqa: E402

from finegrain.env import cpu_family_model, cpu_model  # noqa: E402

FINEGRAIN = str(Path(sys.executable).with_name("finegrain"))
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "finegrain --help": [FINEGRAIN, "--help"],
    "finegrain train --help": [FINEGRAIN, "train", "--help"],
}
TARGETS = {"finegrain --help": 1.0, "finegrain train --help": 1.5}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cli_speed.json"))
    args = p.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    machine0, wall0 = machine_cpu_s(), time.perf_counter()
    for _ in range(args.runs + 1):  # the first round warms the file cache and is dropped
        for name, cmd in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - start)
    busy_cores = (machine_cpu_s() - machine0) / (time.perf_counter() - wall0)
    rows = {}
    print(f"{'command':26s}{'median s':>10s}{'min':>8s}{'max':>8s}{'target':>8s}")
    for name, t in times.items():
        t = t[1:]
        rows[name] = {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3),
                      "max_s": round(max(t), 3), "target_s": TARGETS.get(name)}  # fmt: skip
        r = rows[name]
        target = f"{r['target_s']:.1f}" if r["target_s"] else "-"
        print(f"{name:26s}{r['median_s']:10.3f}{r['min_s']:8.3f}{r['max_s']:8.3f}{target:>8s}")
    result = {"cpu": f"{cpu_model()}, {cpu_family_model()}", "runs": args.runs, "date": time.strftime("%Y-%m-%d"),
              "machine_cores_busy_meanwhile": round(busy_cores, 2), "commands": rows}  # fmt: skip
    write_json(Path(args.out), result)
    print(f"machine cores busy meanwhile (these commands included): {busy_cores:.2f}; written {args.out}")


if __name__ == "__main__":
    main()
