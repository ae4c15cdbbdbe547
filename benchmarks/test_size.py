"""A larger input at test time than in training, and flip averaging: top-1 of trained runs on validation and test.

Random-resized crops show the network objects larger than a whole-image resize does, so a larger test input can
help (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"). Each run's ``best.pt`` is evaluated at
its own input, +32 and +64 px (``eval_transform`` at that ``input_size``, bf16 where native), and with flip
averaging unless ``:noflip`` follows the run (mirror-image classes).

    python benchmarks/test_size.py RUN_DIR[:noflip] ... [--splits val test] --out benchmarks/results/test_size.json
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from finegrain.checkpoint import Checkpoint
from finegrain.data.transforms import Mirrored, eval_transform

sys.path.insert(0, str(Path(__file__).parent))
from _runs import over_runs, probabilities, top1  # noqa: E402


def measure(run: Path, flag: str, splits: list[str]) -> dict:
    """``flag``: ``noflip`` leaves flip averaging out (mirror-image classes)."""
    ckpt = Checkpoint.load(run / "best.pt")
    model, data = ckpt.build_model().eval().to(memory_format=torch.channels_last), ckpt.dataset()
    base, result = model.preprocess, {}
    for split in splits:
        samples = data.split(split)
        y = torch.tensor([s.label for s in samples])
        for size in (base.input_size, base.input_size + 32, base.input_size + 64):
            tf = eval_transform(dataclasses.replace(base, input_size=size))
            p = probabilities(model, samples, tf)
            result[f"{split} {size}"] = top1(p, y)
            if flag != "noflip":
                p = p + probabilities(model, samples, Mirrored(tf))
                result[f"{split} {size}+flip"] = top1(p, y)
    return result


def main() -> None:
    over_runs(__doc__, "benchmarks/results/test_size.json", measure, "RUN_DIR, or RUN_DIR:noflip")


if __name__ == "__main__":
    main()
