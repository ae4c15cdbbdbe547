"""What the benchmarks that re-read trained runs share: ``RUN_DIR[:flag] ...`` and ``--splits`` on the command line,
top-1 of summed probabilities, and the results written after each run (a long list resumes by hand from its JSON)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from _results import write_json

from finegrain.data import ImageDataset
from finegrain.data.transforms import eval_transform
from finegrain.engine.evaluate import autocast


@torch.inference_mode()
def probabilities(model, samples, transform) -> torch.Tensor:
    """Softmax of ``model`` over ``samples`` seen through ``transform`` (bf16 where native, 2 loader workers)."""
    loader = torch.utils.data.DataLoader(ImageDataset(samples, transform), batch_size=64, num_workers=2)
    out = []
    for x, _ in loader:
        with autocast(torch.device("cpu"), "auto"):
            out.append(model(x.contiguous(memory_format=torch.channels_last)).float().softmax(1))
    return torch.cat(out)


def top1(p: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 in percent of (summed) probabilities ``p`` against labels ``y``."""
    return round(100 * float((p.argmax(1) == y).double().mean()), 2)


def split_top1(model, data, splits: list[str]) -> dict[str, float]:
    """Top-1 in percent of ``model`` (eval mode) on each of ``data``'s ``splits``, through its own eval transform."""
    out = {}
    for split in splits:
        samples = data.split(split)
        y = torch.tensor([s.label for s in samples])
        out[split] = top1(probabilities(model, samples, eval_transform(model.preprocess)), y)
    return out


def over_runs(doc: str, out: str, measure: Callable[[Path, str, list[str]], dict], runs_help: str, **meta) -> None:
    """The command line: ``measure(run_dir, flag, splits)`` for each ``RUN_DIR[:flag]``, printed and written to
    ``--out`` (with ``meta``) after each."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("runs", nargs="+", help=runs_help)
    p.add_argument("--splits", nargs="+", default=["val", "test"], choices=["val", "test"])
    p.add_argument("--out", default=out)
    args = p.parse_args()
    results = {}
    for spec in args.runs:
        path, _, flag = spec.partition(":")
        results[path] = measure(Path(path), flag, args.splits)
        print(path, results[path], flush=True)
        write_json(args.out, {**meta, "splits": args.splits, "runs": results})
