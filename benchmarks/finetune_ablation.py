"""Which fine-tuning ingredients earn their place on four domains: the budgeted recipe's fine-tuning stage, one
ingredient changed at a time, on cub100, flowers17, plantvillage_tomato and gtsrb_finegrained.

Per dataset and seed: the head on cached features (the recipe's first stage, fitted once), then for each variant the
whole network fine-tuned from it for ``--epochs`` epochs exactly as ``finegrain train --budget`` does
(``finetune_config``: AdamW at ``--finetune-lr``, BatchNorm statistics frozen, the head's view), with the variant's
options on top. A fixed number of epochs, not a time budget, so that a slower ingredient is judged on what it
learns (its seconds are recorded beside it). The decision uses validation top-1 only: an ingredient is kept where
its mean gain over the four datasets is positive and it loses on none by more than the seeds' spread; test top-1 is
written for the final numbers. Finished runs are saved at once and skipped on a re-run, so a stopped ablation
continues where it stopped.

Budget: about 12 minutes per variant and seed on 2 CPU cores (AMD EPYC Zen 4, bf16, 2026-11-28) at 2 epochs.

    python benchmarks/finetune_ablation.py --seeds 0 1 --epochs 2
    python benchmarks/finetune_ablation.py --variants base ema --datasets plantvillage_tomato --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig, default_cache_dir
from finegrain.engine.recipe import finetune_config, head_config
from finegrain.engine.train import fit
from finegrain.report.evaluation import evaluate_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from peer_timm import DATASETS  # noqa: E402

#: one change each against ``base`` (the recipe as it is); the options are ``finegrain train``'s own
VARIANTS: dict[str, dict] = {
    "base": {},
    "ema": {"ema": True, "ema_decay": 0.99},  # 0.999 would average over more steps than 2 epochs of tomato hold
    "random erasing": {"random_erasing": 0.25},
    "no label smoothing": {"label_smoothing": 0.0},
    "batch BN statistics": {"freeze_bn_stats": False},
    "lr 1e-4": {"lr": 1e-4},
    "lr 4e-4": {"lr": 4e-4},
    "crop area from 0.08": {"scale_min": 0.08},
    "no colour jitter": {"color_jitter": 0.0},
    "no flip": {"hflip": 0.0},  # gtsrb_finegrained has mirror-image classes (keep left / keep right)
}


def summary(rows: list[dict]) -> dict:
    """Per variant and dataset: validation and test top-1 (mean, sd over seeds); per variant the mean validation gain
    over base across datasets and whether it is kept (that gain > 0 and no dataset worse by more than its spread)."""
    table: dict = {}
    for r in rows:
        table.setdefault(r["variant"], {}).setdefault(r["dataset"], []).append(r)
    out: dict = {}
    for variant, per in table.items():
        cells = {}
        for name, runs in per.items():
            val, test = [r["val_top1"] for r in runs], [r["top1"] for r in runs]
            sd = statistics.stdev(val) if len(val) > 1 else 0.0
            cells[name] = {"val_top1": statistics.mean(val), "val_sd": sd, "top1": statistics.mean(test),
                           "seconds": statistics.mean(r["seconds"] for r in runs), "seeds": len(runs)}  # fmt: skip
        out[variant] = {"datasets": cells}
    base = out.get("base", {}).get("datasets", {})
    for variant, s in out.items():
        common = [n for n in s["datasets"] if n in base]
        if variant == "base" or not common:
            continue
        gains = {n: s["datasets"][n]["val_top1"] - base[n]["val_top1"] for n in common}
        spread = {n: max(s["datasets"][n]["val_sd"], base[n]["val_sd"]) for n in common}
        s["val_gain_mean"] = statistics.mean(gains.values())
        s["kept"] = s["val_gain_mean"] > 0 and all(gains[n] >= -spread[n] for n in common)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs of every variant (2)")
    p.add_argument("--work-dir", default="runs/bench_finetune_ablation")
    p.add_argument("--cache-dir", default=default_cache_dir())
    p.add_argument("--out", default="benchmarks/results/finetune_ablation.json")
    args = p.parse_args()

    out, work = Path(args.out), Path(args.work_dir)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {(r["variant"], r["dataset"], r["seed"]) for r in rows}
    for seed in args.seeds:  # seed-major: every dataset and variant has a first seed before any has a second
        for name in args.datasets:
            base = TrainConfig().replace(data=str(DATASETS[name]), seed=seed, cache_dir=args.cache_dir)
            head_dir = work / name / f"head{seed}"
            if not (head_dir / "best.pt").is_file():
                fit(head_config(base, head_dir))
            head = Checkpoint.load(head_dir / "best.pt")
            for variant in args.variants:
                if (variant, name, seed) in done:
                    continue
                run_dir = work / name / f"{variant.replace(' ', '_')}{seed}"
                cfg = finetune_config(base, head, args.epochs, run_dir).replace(**VARIANTS[variant])
                start = time.perf_counter()
                fit(cfg)
                seconds = time.perf_counter() - start
                best = Checkpoint.load(run_dir / "best.pt")
                test = evaluate_checkpoint(run_dir / "best.pt", workers=2)
                rows.append({"variant": variant, "dataset": name, "seed": seed, "seconds": round(seconds, 1),
                             "val_top1": 100 * best.metrics["val_top1"], "top1": 100 * test["top1"],
                             "head_val_top1": 100 * head.metrics["val_top1"],
                             "options": VARIANTS[variant]})  # fmt: skip
                print(f"{name} seed {seed} {variant}: val {rows[-1]['val_top1']:.2f}, test {rows[-1]['top1']:.2f} "
                      f"({seconds:.0f} s)", flush=True)  # fmt: skip
                write_json(out, {"epochs": args.epochs, "rows": rows, "summary": summary(rows)})

    result = summary(rows)
    print(f"\n{'variant':22s}" + "".join(f"{n[:12]:>14s}" for n in args.datasets) + f"{'val gain':>10s}  kept")
    for variant, s in result.items():
        cells = "".join(
            f"{s['datasets'][n]['val_top1']:>8.2f}±{s['datasets'][n]['val_sd']:<5.2f}" if n in s["datasets"] else
            f"{'-':>14s}" for n in args.datasets
        )  # fmt: skip
        gain = f"{s['val_gain_mean']:>+10.2f}" if "val_gain_mean" in s else f"{'':>10s}"
        print(f"{variant:22s}{cells}{gain}  {s.get('kept', '')}")


if __name__ == "__main__":
    main()
