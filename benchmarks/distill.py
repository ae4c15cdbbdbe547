"""Knowledge distillation on cub100: the default student (frozen lite0, 224 px, linear head on cached features)
trained with and without a teacher, same budget, several seeds; test top-1 as mean ± spread.

With a frozen student backbone the training views are fixed, so the teacher's soft labels are computed once per
view and cached (the "frozen-augmentation" setting). The teacher is any finegrain checkpoint of the same classes,
e.g. lite0 at 320 px: ``finegrain train --input-size 320 --run-dir runs/teacher320``.

    python benchmarks/distill.py --teacher runs/teacher320/best.pt --seeds 0 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _results import write_json

from finegrain.config import TrainConfig
from finegrain.engine.train import fit
from finegrain.report.evaluation import evaluate_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, nargs="+")
    p.add_argument("--data", default=TrainConfig().dataset.data)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--kd-temperature", type=float, default=4.0)
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--work-dir", default="runs/bench_distill")
    p.add_argument("--out", default="benchmarks/results/distill_cub100.json")
    args = p.parse_args()

    teacher_eval = [
        evaluate_checkpoint(t, out_dir=Path(args.work_dir) / f"teacher{i}") for i, t in enumerate(args.teacher)
    ]
    rows = []
    for seed in args.seeds:
        for name, teachers in (("student alone", []), ("student + teacher", args.teacher)):
            run_dir = Path(args.work_dir) / f"{'kd' if teachers else 'plain'}_seed{seed}"
            cfg = TrainConfig().replace(
                data=args.data, seed=seed, teachers=list(teachers), kd_temperature=args.kd_temperature,
                kd_alpha=args.kd_alpha, run_dir=str(run_dir),
            )  # fmt: skip
            start = time.perf_counter()
            fit(cfg)
            seconds = time.perf_counter() - start
            r = evaluate_checkpoint(run_dir)
            rows.append({"variant": name, "seed": seed, "top1": r["top1"], "mean_class_acc": r["mean_class_acc"],
                         "seconds": seconds})  # fmt: skip
            print(f"{name} seed {seed}: top-1 {100 * r['top1']:.2f}%", flush=True)

    print(f"\n{'variant':20s} {'top-1 mean':>10s} {'spread':>7s} seeds")
    summary = {}
    for name in ("student alone", "student + teacher"):
        values = [100 * r["top1"] for r in rows if r["variant"] == name]
        mean, spread = statistics.fmean(values), (max(values) - min(values)) / 2
        summary[name] = {"top1_mean": mean, "top1_half_range": spread, "values": values}
        print(f"{name:20s} {mean:10.2f} {spread:7.2f} {values}")
    for t, e in zip(args.teacher, teacher_eval, strict=True):
        print(f"teacher {t}: top-1 {100 * e['top1']:.2f}%")
    meta = {"date": time.strftime("%Y-%m-%d"), "teachers": args.teacher, "seeds": args.seeds,
            "kd_temperature": args.kd_temperature, "kd_alpha": args.kd_alpha,
            "teacher_top1": [e["top1"] for e in teacher_eval]}  # fmt: skip
    write_json(args.out, {"meta": meta, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
