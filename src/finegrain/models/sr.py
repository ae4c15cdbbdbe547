"""A small learned super-resolution network (ESPCN-style, Shi et al. 2016) and the helpers that use it.

Low resolution loses exactly the small details FGVC needs; this network restores some of them. It predicts a
residual on top of bicubic upscaling through sub-pixel convolution (PixelShuffle): the last layer starts at
zero, so an untrained model *is* bicubic and training can only add detail, and a few thousand CPU steps on the
training images suffice. ``finegrain sr train`` trains it (finegrain.engine.sr); training uses it to simulate
low-resolution inputs and restore them (``--sr-aug``), and prediction upscales small inputs with it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from finegrain.errors import ConfigError


class ESPCN(nn.Module):
    """RGB in [0, 1] at low resolution -> RGB at ``scale`` x the resolution."""

    def __init__(self, scale: int = 2, channels: int = 64) -> None:
        super().__init__()
        if scale not in (2, 3, 4):
            raise ConfigError(f"super-resolution scale must be 2, 3 or 4, got {scale}")
        self.scale = scale
        self.body = nn.Sequential(
            nn.Conv2d(3, channels, 5, padding=2),
            nn.Tanh(),
            nn.Conv2d(channels, channels // 2, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(channels // 2, 3 * scale * scale, 3, padding=1),
        )
        self.shuffle = nn.PixelShuffle(scale)
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return up + self.shuffle(self.body(x))


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def to_image(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))


@torch.inference_mode()
def sr_upscale(model: ESPCN, img: Image.Image) -> Image.Image:
    """One image, ``model.scale`` x larger."""
    return to_image(model(to_tensor(img)[None])[0])


def downscale(img: Image.Image, scale: int) -> Image.Image:
    """The low-resolution version of an image (bicubic, antialiased), as the model is trained to undo."""
    return img.resize((max(1, img.width // scale), max(1, img.height // scale)), Image.BICUBIC)


class SRAugment:
    """Training transform: with probability ``p`` an image is reduced by the model's scale (a low-resolution
    photo) and restored by the model, so the classifier learns from what restored small images look like."""

    def __init__(self, model: ESPCN, p: float) -> None:
        self.model, self.p = model.eval(), p

    def __call__(self, img: Image.Image, *rest):
        if torch.rand(()) < self.p:
            small = downscale(img, self.model.scale)
            img = sr_upscale(self.model, small).resize(img.size, Image.BICUBIC)
        return (img, *rest) if rest else img


class SRUpscaleSmall:
    """Inference transform: images whose shorter side is below ``min_side`` are upscaled by the model (repeatedly,
    up to 3 times) before the usual preprocessing; larger ones pass unchanged."""

    def __init__(self, model: ESPCN, min_side: int) -> None:
        self.model, self.min_side = model.eval(), min_side

    def __call__(self, img: Image.Image) -> Image.Image:
        for _ in range(3):
            if min(img.size) >= self.min_side:
                break
            img = sr_upscale(self.model, img)
        return img
