"""How large a dataset's photos are, read from their headers (no decoding), and the input size that suits them.

Why: a network at its ImageNet size (224 px for lite0) spends most of its time on pixels a small photo does not
have. gtsrb_finegrained's photos are 32 px: at 224 px they are upsampled 7x, and the default 10-minute recipe
fine-tuned 2 epochs of the whole network (75.71% test) or 6 epochs of its last 2 stages on cached maps (74.48%);
at 128 px (4x) it fine-tuned 6 epochs of the whole network and reached 77.71% (seed 0, Intel Xeon family 6 model 167,
2026-12-03, ``benchmarks/input_size.py``). Photos at least a quarter of the native size are left at it: none of
the other three domains is affected (their photos are 256 px and more).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from PIL import Image

from finegrain.data.records import Sample

#: the input is this many times the photos' typical longer side (measured at 4x only: 128 px for 32-px photos)
UPSCALE = 4
#: and at least this many pixels: below it the ImageNet weights' last maps are 2 x 2 or smaller
MIN_INPUT = 96
#: photos whose headers are read: evenly spaced over the list, enough for a median
SAMPLE = 200


def typical_side(samples: Sequence[Sample], n: int = SAMPLE) -> int | None:
    """The median longer side of up to ``n`` evenly spaced photos (their files' headers); None where none is a
    readable local file (shards, streams)."""
    step = max(1, len(samples) // n)
    sides = []
    for s in samples[::step][:n]:
        if s.member is not None or s.data is not None:
            continue
        try:
            with Image.open(s.path) as img:
                sides.append(max(img.size))
        except OSError:  # unreadable files are the data check's and the loader's to name
            continue
    return int(statistics.median(sides)) if sides else None


def input_for(side: int | None, native: int) -> int:
    """``native``, or ``UPSCALE`` times ``side`` rounded up to a multiple of 32 (at least ``MIN_INPUT``) where that is
    smaller."""
    if side is None:
        return native
    return min(native, max(MIN_INPUT, 32 * math.ceil(UPSCALE * side / 32)))


def scaled_side(side: int, ratio: float) -> int:
    """``ratio`` of ``side`` px in steps of 16 px (convolutions' tiles), at least 32: the recipe's training crops
    (engine/recipe.py) and the low-resolution epochs' crops (engine/addons/low_res.py)."""
    return max(32, 16 * round(ratio * side / 16))
