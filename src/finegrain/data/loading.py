"""Torch datasets over an index: decode images, and fail loudly (or skip on request) on bad files."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from finegrain.data.datasets import Sample
from finegrain.errors import BadImageError, ImageTooLargeError, NotAnImageError


def decode_image(source, name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """A path or binary file -> RGB image, decoded fully (so truncation is detected here).

    Decompression bombs, and images above ``max_pixels``, are refused from the header, before decoding. Errors
    name ``name`` (default: the source) and say why: :class:`NotAnImageError`, :class:`ImageTooLargeError`,
    or :class:`BadImageError` for truncated and corrupt files.
    """
    name = name or str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
    except Image.UnidentifiedImageError as e:
        raise NotAnImageError(name, f"{type(e).__name__}: {e}") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(name, f"{type(e).__name__}: {e}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImageError(name, f"{type(e).__name__}: {e}") from e
    with img:
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLargeError(name, f"{w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,}")
        try:
            img.load()
            return img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:
            raise BadImageError(name, f"{type(e).__name__}: {e}") from e


def open_image(path: str | Path) -> Image.Image:
    """An image file -> RGB image; a bad file raises :class:`BadImageError` naming it."""
    return decode_image(path)


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
