"""The shape every finegrain method shares: a backbone, then a trainable head on what the backbone gives.

Splitting ``backbone_features`` from ``head`` is what makes the frozen-backbone fast path general: the
engine caches ``backbone_features`` once and trains ``head`` on them, for any method built this way.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from finegrain.models.backbone import DEFAULT_BACKBONE, backbone_preprocess, create_backbone


class FGVCModel(nn.Module):
    head: nn.Module
    #: names what ``backbone_features`` computes, so feature caches of different methods never mix
    feature_spec: str = "pooled"

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        pretrained: bool = True,
        weights: str | Path | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        self._backbone_spec = {"name": backbone, "pretrained": pretrained, "weights": weights}
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights, num_classes=0)
        self.preprocess = backbone_preprocess(self.backbone)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> FGVCModel:
        super().train(mode)
        if self.freeze_backbone:  # frozen means frozen BatchNorm statistics too
            for m in [self.backbone, *(m for m in self.modules() if getattr(m, "is_backbone_copy", False))]:
                m.eval()
        return self

    def backbone_copies(self, n: int) -> nn.ModuleList:
        """``n`` more backbones built like ``self.backbone`` and frozen like it, for methods that give each scale
        or part its own encoder; ``train()`` keeps them in eval mode when frozen."""
        copies = nn.ModuleList(create_backbone(num_classes=0, **self._backbone_spec) for _ in range(n))
        copies.is_backbone_copy = True
        if self.freeze_backbone:
            copies.requires_grad_(False)
        return copies

    #: why this configuration cannot be exported to ONNX (None: it can)
    export_blocker: str | None = None

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone_features(x))
