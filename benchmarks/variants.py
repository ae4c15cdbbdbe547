"""A tried option beside the plain recipe, piece by piece: ``frontier.py --variant LABEL`` pieces against the plain
pieces of the same dataset, budget and seed, on validation (what a choice is made on) and test.

Validation is the kept stage's top-1 on the run's validation split (``recipe.json``), as images right of the split
(``RUN_DIR/split.csv`` of either run, where its folder is still on disk: one seed, one split); pooled per budget,
the images gained over every pair, and the mean over the datasets of each one's validation and test differences
(the issue's "on average across the domains").

    python benchmarks/variants.py lowres75 lowres50 --out benchmarks/results/variants_lowres.json
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402
from frontier import RESULTS, cpu_slug  # noqa: E402


def val_count(piece: dict) -> int | None:
    """The validation images of the piece's run (its split.csv), None where the run folder is gone."""
    found = re.search(r"--run-dir (\S+)", piece.get("command", ""))
    split = Path(found.group(1)) / "split.csv" if found else None
    if split is None or not split.is_file():
        return None
    with split.open() as f:
        return sum(row["split"] == "val" for row in csv.DictReader(f))


def summary(piece: dict) -> dict:
    recipe = piece["recipe"]
    kept = recipe["stages"][recipe["kept"]]
    n = val_count(piece)
    return {"test_top1": round(piece["top1"], 2), "val_top1": round(100 * kept["val_top1"], 2),
            "val_right": round(kept["val_top1"] * n) if n else None, "val_n": n, "minutes": piece["minutes"],
            "epochs": kept.get("epochs"), "kept": recipe["kept"], "busy": piece["busy"]}  # fmt: skip


def val_cell(row: dict) -> str:
    """Validation images right / of, or the top-1 in percent where both runs' folders (their split.csv) are gone."""
    return f"{row['val_right']}/{row['val_n']}" if row["val_n"] else f"{row['val_top1']:.2f}%"


def pairs(root: Path, label: str) -> list[dict]:
    rows = []
    for path in sorted(root.glob(f"*/budget*-{label}_seed*.json")):
        budget, seed = re.fullmatch(rf"budget([\d.]+)-{re.escape(label)}_seed(\d+)", path.stem).groups()
        plain = path.with_name(f"budget{budget}_seed{seed}.json")
        if not plain.is_file():
            print(f"{path.name}: no plain piece {plain.name} to compare with, left out")
            continue
        a, b = (summary(json.loads(p.read_text())) for p in (plain, path))
        n = a["val_n"] or b["val_n"]  # one seed, one split: either run's split.csv counts both
        for row in (a, b):
            row["val_n"], row["val_right"] = n, round(row["val_top1"] * n / 100) if n else None
        rows.append({"dataset": path.parent.name, "budget": float(budget), "seed": int(seed), "plain": a, label: b})
    return rows


def pool(rows: list[dict], label: str) -> dict:
    """One budget's pairs together: validation images gained (where both splits are on disk), the mean over the
    datasets of each one's mean validation and test top-1 differences."""
    counted = [r for r in rows if r["plain"]["val_right"] is not None and r[label]["val_right"] is not None]
    by_domain: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        a, b = r["plain"], r[label]
        by_domain.setdefault(r["dataset"], []).append((b["val_top1"] - a["val_top1"], b["test_top1"] - a["test_top1"]))
    mean = lambda i: round(statistics.mean(statistics.mean(d[i] for d in v) for v in by_domain.values()), 2)  # noqa: E731
    gained = sum(r[label]["val_right"] - r["plain"]["val_right"] for r in counted)
    return {"pairs": len(rows), "val_images_gained": gained, "val_images": sum(r["plain"]["val_n"] for r in counted),
            "domain_mean_val_gain_pt": mean(0), "domain_mean_test_gain_pt": mean(1)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("labels", nargs="+", help="the --variant labels of frontier.py's pieces")
    p.add_argument("--cpu", help="the pieces' CPU folder (default: this machine's)")
    p.add_argument("--out", default=str(RESULTS / "variants.json"))
    args = p.parse_args(argv)
    root = RESULTS / "frontier" / (args.cpu or cpu_slug())
    out = {"cpu_pieces": root.name, "variants": {}}
    for label in args.labels:
        rows = pairs(root, label)
        print(f"\n{label} against the plain recipe (validation images right / of; test top-1; minutes)")
        print(f"{'dataset':<20} {'budget':>6} {'seed':>4} {'val plain':>10} {'val ' + label:>14} "
              f"{'test plain':>10} {'test ' + label:>14} {'min':>11}")  # fmt: skip
        for r in rows:
            a, b = r["plain"], r[label]
            print(f"{r['dataset']:<20} {r['budget']:>6g} {r['seed']:>4} {val_cell(a):<10} {val_cell(b):<14} "
                  f"{a['test_top1']:>10.2f} {b['test_top1']:>14.2f} "
                  f"{a['minutes']:>5.1f}/{b['minutes']:<5.1f}")  # fmt: skip
        pooled = {f"{b:g}": pool([r for r in rows if r["budget"] == b], label)
                  for b in sorted({r["budget"] for r in rows})}  # fmt: skip
        for budget, row in pooled.items():
            print(f"pooled, --budget {budget}: {row}")
        out["variants"][label] = {"pairs": rows, "pooled": pooled}
    write_json(args.out, out)


if __name__ == "__main__":
    main()
