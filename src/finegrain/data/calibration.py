"""Which images calibrate a model (int8 ranges, QAT, pruning importance), and how they are fed.

Calibration images always go through the evaluation preprocessing, so a calibrated model sees activations in
the range it meets in use; they are spread evenly over the class-sorted training split, so every class is
represented, and never drawn from validation or test images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from finegrain.data.loading import ImageDataset
from finegrain.data.records import Sample
from finegrain.data.transforms import Preprocess, eval_transform


def calibration_loader(samples: Sequence[Sample], pre: Preprocess, batch_size: int = 16):
    """(images, labels) batches of ``samples`` through the evaluation preprocessing."""
    return torch.utils.data.DataLoader(ImageDataset(samples, eval_transform(pre)), batch_size=batch_size)


def evenly_spaced(samples: Sequence[Sample], count: int) -> list[Sample]:
    """``count`` samples spread evenly over the (class-sorted) list: every class is represented."""
    step = max(1, len(samples) // count)
    return list(samples[::step][:count])


def held_out(samples: Sequence[Sample], used: Sequence[Sample], count: int) -> list[Sample]:
    """``count`` of ``samples`` that are not in ``used``, evenly spread: e.g. images int8 was not calibrated on."""
    seen = {s.key for s in used}
    return evenly_spaced([s for s in samples if s.key not in seen], count)
