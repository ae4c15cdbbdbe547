"""Torch datasets over an index: decode images, and fail loudly (or skip on request) on bad files."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from finegrain.data.datasets import Sample
from finegrain.errors import BadImageError


def open_image(path: str | Path) -> Image.Image:
    """Decode fully (so truncation is detected here) and convert to RGB; a decompression bomb is an error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(str(path), f"{type(e).__name__}: {e}") from e


def find_bad_images(samples: Sequence[Sample], progress: bool = False) -> list[tuple[Sample, str]]:
    """Return (sample, reason) for every file that does not decode."""
    from tqdm import tqdm

    bad = []
    for s in tqdm(samples, desc="checking images", disable=not progress, leave=False):
        try:
            open_image(s.path)
        except BadImageError as e:
            bad.append((s, str(e.__cause__)))
    return bad


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label) pairs; a bad file raises :class:`BadImageError` naming it."""

    def __init__(self, samples: Sequence[Sample], transform: Callable | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        img = open_image(s.path)
        return (self.transform(img) if self.transform else img), s.label
