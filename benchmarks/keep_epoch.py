"""Which epoch to keep: a trained stage's best-validated epoch (``best.pt`` under ``--keep-epoch best``) against its
schedule's end (``last.pt``), on validation and test, and what ``--keep-epoch auto`` decides from the validation
answers (engine/epochs.py: ``earlier_is_better``).

Each STAGE_DIR is a training run's folder holding both files (a recipe's ``RUN_DIR/finetune``). The test numbers are
final numbers: the choice itself is made on validation, by ``auto``.

    python benchmarks/keep_epoch.py STAGE_DIR ... --out benchmarks/results/keep_epoch.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from finegrain.checkpoint import Checkpoint
from finegrain.data.transforms import eval_transform
from finegrain.engine.epochs import earlier_is_better
from finegrain.run_layout import RunDir

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from _runs import probabilities  # noqa: E402


def answers(ckpt: Checkpoint, split: str) -> list[bool]:
    model = ckpt.build_model().eval().to(memory_format=torch.channels_last)
    samples = ckpt.dataset().split(split)
    p = probabilities(model, samples, eval_transform(model.preprocess))
    return (p.argmax(1) == torch.tensor([s.label for s in samples])).tolist()


def measure(stage: Path) -> dict:
    best, last = Checkpoint.load(stage / RunDir.BEST), Checkpoint.load(stage / RunDir.LAST)
    row: dict = {"best_epoch": best.epoch + 1, "end_epoch": last.epoch + 1}
    val = {name: answers(c, "val") for name, c in (("best", best), ("end", last))}
    earlier, counts = earlier_is_better(val["best"], val["end"])
    row["auto_keeps"] = "best" if earlier or best.epoch == last.epoch else "end"
    row["auto_counts"] = counts
    for name, c in (("best", best), ("end", last)):
        row[f"val_{name}"] = round(100 * sum(val[name]) / len(val[name]), 2)
        test = answers(c, "test")
        row[f"test_{name}"] = round(100 * sum(test) / len(test), 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stages", nargs="+", help="a training run's folder with best.pt and last.pt")
    p.add_argument("--out", default="benchmarks/results/keep_epoch.json")
    args = p.parse_args()
    rows = {}
    print(f"{'stage':60s} {'epochs best/end':>16s} {'val best/end':>14s} {'test best/end':>14s} {'auto keeps':>10s}")
    for stage in args.stages:
        r = rows[stage] = measure(Path(stage))
        print(f"{stage[-60:]:60s} {r['best_epoch']:>7d}/{r['end_epoch']:<8d} {r['val_best']:>6.2f}/{r['val_end']:<7.2f}"
              f" {r['test_best']:>6.2f}/{r['test_end']:<7.2f} {r['auto_keeps']:>10s}", flush=True)  # fmt: skip
        write_json(args.out, {"runs": rows})
    ends = [r["test_end"] - r["test_best"] for r in rows.values()]
    print(f"the end minus the best-validated epoch on test: mean {sum(ends) / len(ends):+.2f} pt over {len(ends)} runs")


if __name__ == "__main__":
    main()
