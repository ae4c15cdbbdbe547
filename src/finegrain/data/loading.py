"""Torch datasets over an index: decode images, and fail loudly (or skip on request) on bad files."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from finegrain.data.parts import part_boxes
from finegrain.data.records import MAX_ASPECT, Sample
from finegrain.errors import BadImageError, DataError, ImageTooLargeError, NotAnImageError
from finegrain.progress import progress_bar

#: what counts as an image where a folder is scanned for them (predict, unlabelled images, class references)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_images(target: str | Path) -> list[Path]:
    """An image file, or every image file under a folder (sorted)."""
    target = Path(target).expanduser()
    if target.is_file():
        return [target]
    if target.is_dir():
        files = sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under '{target}'")
        return files
    raise DataError(f"'{target}' does not exist: pass an image file or a folder of images")


def decode_image(source, name: str | None = None, max_pixels: int | None = None,
                 max_aspect: float = MAX_ASPECT) -> Image.Image:  # fmt: skip
    """A path or binary file -> RGB image, decoded fully (so truncation is detected here).

    Decompression bombs, images above ``max_pixels`` and images more than ``max_aspect`` times longer than wide
    (or wide than long) are refused from the header, before decoding. Errors name ``name`` (default: the source)
    and say why: :class:`NotAnImageError`, :class:`ImageTooLargeError`, or :class:`BadImageError` for truncated
    and corrupt files.
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
        if max(w, h) > max_aspect * min(w, h):
            raise ImageTooLargeError(name, f"{w}x{h} is {max(w, h) / min(w, h):,.0f} times longer than wide, above "
                                           f"the limit of {max_aspect:g}:1; crop it to the object")  # fmt: skip
        try:
            img.load()
            return to_rgb(img)
        except (OSError, ValueError, SyntaxError) as e:
            raise BadImageError(name, f"{type(e).__name__}: {e}") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode Pillow decodes, without losing the picture on the way.

    Pillow's own ``convert("RGB")`` clips 16-bit and 32-bit integer pixels at 255 (a 16-bit grayscale PNG came out
    99.6% white) and drops alpha, so transparent pixels show whatever colour they hide. Here high-bit-depth images
    are rescaled to 0-255 from their bit depth, and transparency is composited over white (a catalogue photo's
    background).
    """
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
        elif img.mode.startswith("I;16") or (a.size and a.max() > 255):
            scale = 255.0 / 65535.0  # 16-bit samples (Pillow may also read them as mode "I")
        else:
            scale = 1.0
        gray = np.clip(np.nan_to_num(a * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """An image file -> RGB image; a bad file raises :class:`BadImageError` naming it."""
    return decode_image(path)


def as_image(x) -> Image.Image:
    """What a Python caller hands to ``predict``: a path, a PIL image, or an ``H x W x 3`` (or ``H x W``) uint8
    array (numpy or anything ``np.asarray`` reads, e.g. OpenCV's BGR arrays after ``[..., ::-1]``) -> RGB."""
    if isinstance(x, str | Path):
        return open_image(x)
    if isinstance(x, Image.Image):
        return to_rgb(x)
    a = np.asarray(x)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise DataError(f"an image array must be uint8, H x W or H x W x 3 (RGB); got {a.dtype} of shape {a.shape}: "
                        "convert it with (array * 255).clip(0, 255).astype('uint8') or pass a file path")  # fmt: skip
    return to_rgb(Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a))


def open_sample(sample: Sample) -> Image.Image:
    """A dataset image (a file, or a member of a shard) as RGB; errors name its ``key``."""
    if sample.member is None and sample.data is None:
        return open_image(sample.path)
    return decode_image(io.BytesIO(sample.read_bytes()), name=sample.key)


def find_bad_images(samples: Sequence[Sample], progress: bool = False) -> list[tuple[Sample, str]]:
    """Return (sample, reason) for every image that does not decode."""

    bad = []
    for s in progress_bar(samples, desc="checking images", disable=not progress, leave=False):
        try:
            open_sample(s)
        except BadImageError as e:
            bad.append((s, str(e.__cause__)))
    return bad


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label) pairs; a bad file raises :class:`BadImageError` naming it.

    With ``part_groups`` (and the dataset's ``part_names``) each item also carries its part boxes, moved by the
    same random crop and flip as the image: ``{"part_boxes": (P, 4) in [0, 1], "part_visible": (P,)}``; a part
    the crop cut out is not visible. With ``columns`` (tensors with a row per sample) item ``i`` carries their rows
    ``i`` after its label: ``(image, label, *rows[, parts])``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable | None = None,
        part_groups: Mapping[str, Sequence[str]] | None = None,
        part_names: Sequence[str] | None = None,
        part_pad: float = 0.1,
        columns: Sequence[torch.Tensor] = (),
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.part_groups, self.part_names, self.part_pad = part_groups, part_names, part_pad
        if any(len(c) != len(self.samples) for c in columns):
            raise ValueError(f"columns need a row per sample ({len(self.samples)}): got {[len(c) for c in columns]}")
        self.columns = list(columns)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        item = self.load(self.samples[i])
        if not self.columns:
            return item
        return (*item[:2], *(c[i] for c in self.columns), *item[2:])

    def load(self, s: Sample):
        """One item: the image transformed, its label, and the method's targets (what ``__getitem__`` gives)."""
        img = open_sample(s)
        if self.part_groups is None:
            return (self.transform(img) if self.transform else img), s.label
        boxes, visible = part_boxes(s, self.part_names, self.part_groups, img.size, self.part_pad)
        boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(img.height, img.width))
        x, boxes = self.transform(img, boxes)
        h, w = boxes.canvas_size
        boxes = boxes.as_subclass(torch.Tensor) / torch.tensor([w, h, w, h], dtype=torch.float32)
        visible = visible & ((boxes[:, 2:] - boxes[:, :2]) > 0).all(1)
        return x, s.label, {"part_boxes": boxes, "part_visible": visible}
