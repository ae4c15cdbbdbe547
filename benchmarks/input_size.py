"""The default recipe at other input sizes, for domains whose photos are small (gtsrb_finegrained's are 32 px).

At 224 px a 32-px photo is upsampled 7x: the network pays for pixels that carry nothing. A smaller input buys more
epochs in the same minutes ((224 / 128)^2 = 3.1x at 128 px) at the cost of smaller maps for the ImageNet weights.
Each variant is ``finegrain train`` with no options but ``--input-size`` (the default 10-minute recipe), then
``finegrain evaluate`` on the test split, run as ``benchmarks/frontier.py`` runs the default (CLI subprocess, cold
cache in the run folder, cores used by other work recorded). Prints a table, writes JSON.

    python benchmarks/input_size.py --datasets gtsrb_finegrained --sizes 224 128 96 \
        --out benchmarks/results/input_size.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from frontier import finegrain_cli  # noqa: E402
from peer_timm import DATASETS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["gtsrb_finegrained"], choices=list(DATASETS))
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 96])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=os.path.expanduser("~/.cache/finegrain/input_size"))
    p.add_argument("--out", default="benchmarks/results/input_size.json")
    args = p.parse_args()
    results: dict = {}
    for name in args.datasets:
        for size in args.sizes:  # one at a time: each is a 10-minute run that needs the cores to itself
            run_dir = Path(args.work) / name / f"size{size}_seed{args.seed}"
            row = finegrain_cli(DATASETS[name], run_dir, args.seed, "--input-size", str(size))
            stages = (row["recipe"] or {}).get("stages", {})
            row["finetune_epochs"] = stages.get("finetune", {}).get("epochs")
            row["kept"] = (row["recipe"] or {}).get("kept")
            results.setdefault(name, {})[str(size)] = row
            print(f"{name} {size:4d} px: test top-1 {row['top1']:.2f} in {row['minutes']:.1f} min "
                  f"(kept {row['kept']}, fine-tuning epochs {row['finetune_epochs']}, other work "
                  f"{row['other_cores']:.2f} cores)", flush=True)  # fmt: skip
            write_json(args.out, {"meta": vars(args), "datasets": results})


if __name__ == "__main__":
    main()
