"""A larger input at test time than in training, and flip averaging: top-1 of trained runs on validation and test.

Random-resized crops show the network objects larger than a whole-image resize does, so a larger test input can
help (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"). Each run's ``best.pt`` is evaluated at
its own input, +32 and +64 px (``eval_transform`` at that ``input_size``, bf16 where native), and with flip
averaging unless ``:noflip`` follows the run (mirror-image classes).

    python benchmarks/test_size.py RUN_DIR[:noflip] ... --out benchmarks/results/test_size.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from finegrain.checkpoint import Checkpoint
from finegrain.data import ImageDataset
from finegrain.data.transforms import Mirrored, eval_transform
from finegrain.engine.evaluate import autocast

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_json  # noqa: E402


@torch.inference_mode()
def probabilities(model, samples, transform) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(ImageDataset(samples, transform), batch_size=64, num_workers=2)
    out = []
    for x, _ in loader:
        with autocast(torch.device("cpu"), "auto"):
            out.append(model(x.contiguous(memory_format=torch.channels_last)).float().softmax(1))
    return torch.cat(out)


def measure(run: Path, flips: bool) -> dict:
    ckpt = Checkpoint.load(run / "best.pt")
    model, data = ckpt.build_model().eval().to(memory_format=torch.channels_last), ckpt.dataset()
    base, result = model.preprocess, {}
    for split in ("val", "test"):
        samples = data.split(split)
        y = torch.tensor([s.label for s in samples])
        for size in (base.input_size, base.input_size + 32, base.input_size + 64):
            tf = eval_transform(dataclasses.replace(base, input_size=size))
            p = probabilities(model, samples, tf)
            result[f"{split} {size}"] = round(100 * float((p.argmax(1) == y).double().mean()), 2)
            if flips:
                p = p + probabilities(model, samples, Mirrored(tf))
                result[f"{split} {size}+flip"] = round(100 * float((p.argmax(1) == y).double().mean()), 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="RUN_DIR, or RUN_DIR:noflip")
    p.add_argument("--out", default="benchmarks/results/test_size.json")
    args = p.parse_args()
    results = {}
    for spec in args.runs:
        path, _, flag = spec.partition(":")
        results[path] = measure(Path(path), flag != "noflip")
        print(path, results[path], flush=True)
        write_json(args.out, {"runs": results})


if __name__ == "__main__":
    main()
