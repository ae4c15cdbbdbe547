"""WS-DAN (Hu et al. 2019): weakly supervised data augmentation network — parts without part labels.

M attention maps (a 1x1 conv on the backbone's last feature map) each pool the feature map into one part
feature (bilinear attention pooling: attention-weighted average, signed square root, L2 norm over all parts);
a linear classifier reads the parts together. Center loss keeps each class's part features together, so
attention map k keeps meaning the same part across images.

Training adds two views per batch, both guided by one randomly chosen attention map per image (maps with more
mass are chosen more often): *crop* — the box around that map's region above theta_c ~ U(0.4, 0.6) of its
maximum, enlarged to the input size (look closer at a part); *drop* — the image with the region above
theta_d ~ U(0.2, 0.5) erased (find the other parts). Loss: the mean of the three views' cross-entropies plus
``center_weight`` x center loss. At test time the prediction averages the raw image's logits with those of
the crop around the mean attention map (above ``theta_test`` of its maximum).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from finegrain.errors import ConfigError
from finegrain.losses import CenterLoss
from finegrain.models.base import FGVCModel
from finegrain.models.regions import crop_resize, threshold_boxes, upsample_maps
from finegrain.models.registry import register_model


def bilinear_attention_pool(features: torch.Tensor, attention: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """(B, C, h, w) features, (B, M, h, w) attention -> (B, M*C) part features: per part the attention-weighted
    mean feature, signed square root, L2-normalised over all parts together, times ``scale`` (a unit-norm input
    would give a linear classifier tiny logits)."""
    b, _, h, w = features.shape
    parts = torch.einsum("bmhw,bchw->bmc", attention.float(), features.float()) / (h * w)
    parts = torch.sign(parts) * torch.sqrt(parts.abs() + 1e-12)
    return F.normalize(parts.flatten(1), dim=1) * scale


def attention_crop(x: torch.Tensor, maps: torch.Tensor, theta: torch.Tensor | float, pad: float = 0.1):
    """Crop each image to the box around its (B, h, w) map's region above ``theta`` x max, enlarged to the
    input size; returns (crops, boxes)."""
    boxes = threshold_boxes(upsample_maps(maps, x.shape[-2:]), theta, pad)
    return crop_resize(x, boxes), boxes


def attention_drop(x: torch.Tensor, maps: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """Erase (set to 0: the dataset mean after normalisation) each image's region above ``theta`` x max of its
    (B, h, w) map."""
    up = upsample_maps(maps, x.shape[-2:])
    theta = torch.as_tensor(theta, dtype=up.dtype, device=up.device).reshape(-1, 1, 1)
    keep = up < theta * up.flatten(1).max(1).values[:, None, None]
    return x * keep[:, None].to(x.dtype)


class WSDAN(FGVCModel):
    feature_spec = "wsdan"
    STAGE_SETTINGS = ("augment",)  # progressive training may start without the crop/drop views

    def __init__(
        self,
        num_classes: int,
        num_maps: int = 32,
        center_weight: float = 1.0,
        center_beta: float = 0.05,
        crop_theta: tuple[float, float] = (0.4, 0.6),
        drop_theta: tuple[float, float] = (0.2, 0.5),
        crop_pad: float = 0.1,
        theta_test: float = 0.1,
        test_crop: bool = True,
        drop_rate: float = 0.2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_maps < 1:
            raise ConfigError(f"wsdan num_maps must be >= 1, got {num_maps}")
        for name, (lo, hi) in (("crop_theta", crop_theta), ("drop_theta", drop_theta)):
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"wsdan {name} must be a range inside (0, 1], got ({lo}, {hi})")
        c = self.backbone.num_features
        self.num_maps, self.center_weight = num_maps, center_weight
        self.crop_theta, self.drop_theta = tuple(crop_theta), tuple(drop_theta)
        self.crop_pad, self.theta_test, self.test_crop = crop_pad, theta_test, test_crop
        self.augment = True  # attention crop/drop views in training; progressive stages may switch them on later
        self.attention = nn.Sequential(nn.Conv2d(c, num_maps, 1, bias=False), nn.BatchNorm2d(num_maps), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(num_maps * c, num_classes, bias=False))
        self.center = CenterLoss(num_classes, num_maps * c, center_beta)  # centres are saved: resume keeps them

    def look(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, part features and attention maps (B, M, h, w) of one view."""
        maps = self.backbone.forward_features(x)
        attention = self.attention(maps)
        parts = bilinear_attention_pool(maps, attention)
        return self.head(parts), parts, attention

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The M attention maps (B, M, h, w) on the backbone's feature grid: what explain draws."""
        return self.look(x)[2]

    def _test_crop(self, x: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attention_crop(x, attention.float().mean(1), self.theta_test, pad=0.05)

    def forward(self, x: torch.Tensor):
        logits, parts, attention = self.look(x)
        if self.training and not self.augment:
            return {"logits": logits, "parts": parts}
        if not self.training:
            if not self.test_crop:
                return logits
            crop, _ = self._test_crop(x, attention)
            return (logits + self.look(crop)[0]) / 2
        crop_maps, drop_maps = self._pick_maps(attention.detach().float())
        n = len(x)
        with torch.no_grad():
            crop, _ = attention_crop(x, crop_maps, torch.empty(n).uniform_(*self.crop_theta), self.crop_pad)
            drop = attention_drop(x, drop_maps, torch.empty(n).uniform_(*self.drop_theta))
        views = self.look(torch.cat([crop, drop]).contiguous(memory_format=torch.channels_last))[0]
        return {"logits": logits, "crop_logits": views[:n], "drop_logits": views[n:], "parts": parts}

    def _pick_maps(self, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two maps per image (one for crop, one for drop), drawn with probability ~ sqrt(map mass)."""
        weights = torch.sqrt(attention.sum((2, 3)) + 1e-12)
        idx = torch.multinomial(weights / weights.sum(1, keepdim=True), 2, replacement=True)
        rows = torch.arange(len(attention))
        return attention[rows, idx[:, 0]], attention[rows, idx[:, 1]]

    def compute_loss(self, out: dict, y: torch.Tensor, criterion) -> tuple[torch.Tensor, torch.Tensor]:
        views = [out[k] for k in ("logits", "crop_logits", "drop_logits") if k in out]
        loss = sum(criterion(v.float(), y) for v in views) / len(views)
        if self.center_weight > 0:
            loss = loss + self.center_weight * self.center(out["parts"], y)
        return loss, out["logits"].detach()

    @torch.no_grad()
    def attention_boxes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The test-time crop box (around the mean attention map), (B, 4) in [0, 1] of the input."""
        return [self._test_crop(x, self.look(x)[2])[1].cpu()]


@register_model("wsdan")
def wsdan(num_classes: int, **kwargs) -> WSDAN:
    """WS-DAN: M attention maps, bilinear attention pooling, center loss, attention crop/drop, test-time crop."""
    return WSDAN(num_classes=num_classes, **kwargs)
