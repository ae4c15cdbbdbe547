"""Pictures of explanations: a heat-map laid over the part of the photo the model saw, and top-k bars."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from finegrain.data.transforms import Preprocess
from finegrain.extras import need


def model_view_box(size: tuple[int, int], pre: Preprocess) -> tuple[int, int, int, int]:
    """The region of an image of ``size`` (w, h) that the eval transform keeps (resize + centre crop)."""
    w, h = size
    side = min(w, h) * pre.crop_pct
    left, top = (w - side) / 2, (h - side) / 2
    return round(left), round(top), round(left + side), round(top + side)


def colourise(cam: np.ndarray, cmap: str = "jet") -> Image.Image:
    need("plots", "heat-map pictures (explain, --report, the page)")
    from matplotlib import colormaps

    rgb = colormaps[cmap](np.clip(cam, 0, 1))[..., :3]
    return Image.fromarray((rgb * 255).astype(np.uint8))


BOX_COLOURS = ["#ffffff", "#ffd43b", "#51cf66", "#ff6b6b"]


def overlay(
    image: Image.Image,
    cam: np.ndarray,
    pre: Preprocess,
    alpha: float = 0.6,
    max_side: int = 512,
    boxes: Sequence[Sequence[float]] = (),
) -> Image.Image:
    """The photo (longer side at most ``max_side``) with ``cam`` blended over the model's view, more opaque
    where the map is hotter; what the model did not see (cropped away by the centre crop) is dimmed.
    ``boxes`` (x0, y0, x1, y1 in [0, 1] of the model's input, e.g. RA-CNN's zooms) are drawn as rectangles."""
    image = image.convert("RGB")
    scale = min(1.0, max_side / max(image.size))
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    box = model_view_box(image.size, pre)
    out = Image.blend(image, Image.new("RGB", image.size), 0.6)
    crop = image.crop(box)
    heat = colourise(cam).resize(crop.size, Image.BILINEAR)
    mask = Image.fromarray((255 * alpha * np.clip(cam, 0, 1)).astype(np.uint8)).resize(crop.size, Image.BILINEAR)
    out.paste(Image.composite(heat, crop, mask), box[:2])
    draw = ImageDraw.Draw(out)
    w, h = box[2] - box[0], box[3] - box[1]
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        rect = (box[0] + x0 * w, box[1] + y0 * h, box[0] + x1 * w, box[1] + y1 * h)
        draw.rectangle(rect, outline=BOX_COLOURS[i % len(BOX_COLOURS)], width=3)
    return out


def with_top_classes(picture: Image.Image, top: Sequence[dict], width: int = 360) -> Image.Image:
    """``picture`` with a panel of horizontal probability bars for the top classes on its right."""
    from PIL import ImageFont

    font = ImageFont.load_default(size=14)
    row = 44
    height = max(picture.height, 16 + row * len(top))
    canvas = Image.new("RGB", (picture.width + width, height), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = picture.width + 12
    for i, t in enumerate(top):
        y = 10 + i * row
        draw.text((x0, y), f"{t['class']}  {100 * t['prob']:.1f}%", fill="black", font=font)
        bar = round((width - 24) * t["prob"])
        draw.rectangle((x0, y + 20, x0 + width - 24, y + 32), fill="#e6e6e6")
        draw.rectangle((x0, y + 20, x0 + bar, y + 32), fill="#d9480f" if i == 0 else "#4c6ef5")
    return canvas


def png_bytes(picture: Image.Image) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()
