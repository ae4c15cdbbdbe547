"""Several crops averaged at test time: top-1 of trained runs on validation and test.

A run trained on random-resized crops (scale 0.35-1) has seen its classes at many framings; averaging the softmax of
a few framings at test time (the whole image, the usual centre crop and a closer one; or the ImageNet-era five crops:
four corners and the centre) is the issue's "test-time multi-crop where validation says so". Each run's ``best.pt``
at its own input, bf16 where native, its probabilities averaged over:

- ``centre``: the usual view (resize to input / crop_pct, centre crop), what evaluate, predict and serve use;
- ``3 scales``: the centre view at crop_pct 1.0 (the whole image), the checkpoint's, and 0.75 (closer);
- ``5 crops``: the four corners and the centre of the usual resize;
- ``centre+flip``: the usual view and its mirror image, unless ``:noflip`` follows the run (mirror-image classes).

Each view is one pass over the split (8 in all, 7 with `:noflip`).

    python benchmarks/multicrop.py RUN_DIR[:noflip] ... [--splits val test] --out benchmarks/results/multicrop.json
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from torchvision.transforms import v2 as T

from finegrain.checkpoint import Checkpoint
from finegrain.data.transforms import Mirrored, Preprocess, eval_transform

sys.path.insert(0, str(Path(__file__).parent))
from _runs import over_runs, probabilities, top1  # noqa: E402


class Corner:
    """The usual resize, then crop ``index`` of torchvision's five (top-left, top-right, bottom-left, bottom-right,
    centre), then the usual tensor steps (a class: loader workers pickle it)."""

    def __init__(self, pre: Preprocess, index: int) -> None:
        resize, _centre, *tail = eval_transform(pre).transforms
        self.resize, self.tail = resize, T.Compose(tail)
        self.five, self.index = T.FiveCrop(pre.input_size), index

    def __call__(self, img):
        return self.tail(self.five(self.resize(img))[self.index])


def views(pre: Preprocess, flips: bool) -> dict[str, list]:
    """Each averaging's transforms."""
    centre = eval_transform(pre)
    scales = [eval_transform(dataclasses.replace(pre, crop_pct=p)) for p in (1.0, 0.75)]
    out = {"centre": [centre], "3 scales": [centre, *scales], "5 crops": [centre, *(Corner(pre, i) for i in range(4))]}
    return out | ({"centre+flip": [centre, Mirrored(centre)]} if flips else {})


def measure(run: Path, flag: str, splits: list[str]) -> dict:
    """``flag``: ``noflip`` leaves the mirror image out (mirror-image classes)."""
    ckpt = Checkpoint.load(run / "best.pt")
    model, data = ckpt.build_model().eval().to(memory_format=torch.channels_last), ckpt.dataset()
    result, cached, averagings = {}, {}, views(model.preprocess, flag != "noflip")
    for split in splits:
        samples = data.split(split)
        y = torch.tensor([s.label for s in samples])
        for name, transforms in averagings.items():
            for t in transforms:  # each view once, whichever averagings share it
                if (split, id(t)) not in cached:
                    cached[split, id(t)] = probabilities(model, samples, t)
            p = sum(cached[split, id(t)] for t in transforms)
            result[f"{split} {name}"] = top1(p, y)
        result[f"{split} images"] = len(samples)
    return result


def main() -> None:
    over_runs(__doc__, "benchmarks/results/multicrop.json", measure, "RUN_DIR, or RUN_DIR:noflip")


if __name__ == "__main__":
    main()
