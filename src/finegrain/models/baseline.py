"""The global baseline: backbone, global average pooling, dropout, linear classifier."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from finegrain.models.backbone import backbone_preprocess, create_backbone
from finegrain.models.registry import register_model


class Baseline(nn.Module):
    """``pooled_features`` / ``head`` are split so a frozen backbone's features can be cached once."""

    def __init__(
        self,
        num_classes: int,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: bool = True,
        weights: str | Path | None = None,
        drop_rate: float = 0.2,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights, num_classes=0)
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.backbone.num_features, num_classes))
        self.preprocess = backbone_preprocess(self.backbone)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def train(self, mode: bool = True) -> Baseline:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen means frozen BatchNorm statistics too
        return self

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled_features(x))


@register_model("baseline")
def baseline(num_classes: int, **kwargs) -> Baseline:
    return Baseline(num_classes=num_classes, **kwargs)
