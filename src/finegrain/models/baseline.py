"""The global baseline: backbone, global average pooling, dropout, linear classifier."""

from __future__ import annotations

import torch
import torch.nn as nn

from finegrain.models.base import FGVCModel
from finegrain.models.registry import register_model


class Baseline(FGVCModel):
    feature_spec = "pooled"
    cacheable = True
    needs_spatial_maps = False  # the backbone's own pooling: CNNs and token models (ViT) alike

    def __init__(self, num_classes: int, drop_rate: float = 0.2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.backbone.num_features, num_classes))

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


@register_model("baseline")
def baseline(num_classes: int, **kwargs) -> Baseline:
    return Baseline(num_classes=num_classes, **kwargs)
