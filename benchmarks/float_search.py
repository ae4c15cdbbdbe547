"""What the int8 float-stage search costs and chooses: the search as export runs it (later rounds from the first
round's ``ROUND_WIDTH`` runners-up) beside the wide one (every stage that alone came nearer fp32), alternating,
on one checkpoint. Prints a table (seconds, quantizations, stages kept, validation KL) and writes JSON.

    python benchmarks/float_search.py --checkpoint runs/default/best.pt --repeats 2 \
        --out benchmarks/results/float_search_<cpu>.json

The wide search is not byte-for-byte the search before 2026-12-07: that one also paired the kept stage with stages
that alone moved int8 away from fp32 (never the winners in int8_xeon_amx.json).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _results import write_json

from finegrain.checkpoint import Checkpoint
from finegrain.cpu_load import busy_share
from finegrain.env import cpu_model
from finegrain.export import export_onnx
from finegrain.export import quantize as q


def search(ckpt: str, fp32: str, out: Path, width: int) -> dict:
    q.ROUND_WIDTH, start = width, time.perf_counter()
    made = q.int8_copy(ckpt, fp32, out=out)
    seconds = time.perf_counter() - start
    tried, kept = made["float_search"], made["float_stages"]
    return {"seconds": seconds, "quantizations": len(tried), "kept": kept,
            "kl": tried["+".join(kept) or "none"]["kl"], "agreement": made["agreement"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/default/best.pt")
    p.add_argument("--repeats", type=int, default=2, help="runs of each search, alternating")
    p.add_argument("--out", default="benchmarks/results/float_search.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fg-float-search-"))
    fp32 = export_onnx(Checkpoint.load(args.checkpoint).path, work / "fp32.onnx")["path"]
    widths = {"export (ROUND_WIDTH)": q.ROUND_WIDTH, "wide": 10**6}
    runs: dict[str, list[dict]] = {name: [] for name in widths}
    busy = []
    for r in range(args.repeats):
        for name, width in widths.items():
            busy.append(busy_share(0.5) or 0.0)
            runs[name].append(search(args.checkpoint, fp32, work / f"{r}-{width}.int8.onnx", width))
            print(name, {k: v for k, v in runs[name][-1].items()}, flush=True)
    print(f"\n{'search':22} {'median s':>9} {'quantizations':>14} {'kept':>20} {'val KL':>8}")
    rows = {}
    for name, done in runs.items():
        rows[name] = {"median_seconds": statistics.median(d["seconds"] for d in done), "runs": done}
        print(f"{name:22} {rows[name]['median_seconds']:9.1f} {done[0]['quantizations']:14d} "
              f"{'+'.join(done[0]['kept']) or 'none':>20} {done[0]['kl']:8.4f}")  # fmt: skip
    ratio = rows["wide"]["median_seconds"] / rows["export (ROUND_WIDTH)"]["median_seconds"]
    print(f"wide / export: {ratio:.2f}x; CPUs busy before a search (max share): {max(busy):.2f}")
    write_json(args.out, {"meta": {"checkpoint": args.checkpoint, "cpu": cpu_model(), "repeats": args.repeats,
                                   "busy_before_max": max(busy)}, "rows": rows, "wide_over_export": ratio})  # fmt: skip


if __name__ == "__main__":
    main()
