"""Bilinear CNN (Lin et al. 2015) and compact bilinear pooling (Gao et al. 2016) on a timm backbone.

Streams are feature maps of one backbone: ``layers=("final",)`` is the symmetric B-CNN (the map after the
backbone's last conv, pooled with itself); two entries, e.g. ``(3, "final")``, give a two-stream B-CNN whose
shallower map is average-pooled to the deeper one's size. A 1×1 convolution reduces each stream to
``reduce_dim`` channels first, so the descriptor stays a sane size (256² = 65,536 rather than 1280²).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from finegrain.errors import ConfigError
from finegrain.models.base import FGVCModel
from finegrain.models.pooling import BilinearPool, RandomMaclaurinPool, TensorSketchPool
from finegrain.models.registry import register_model

POOLINGS = ("bilinear", "tensor_sketch", "rm")
MAX_DESCRIPTOR = 512 * 512  # beyond this the classifier alone is hundreds of millions of parameters


class BilinearHead(nn.Module):
    """Channel-reduce each stream, pool second-order, classify. Input: the streams concatenated on channels."""

    def __init__(
        self,
        in_channels: tuple[int, ...],
        num_classes: int,
        reduce_dim: int | None = 256,
        pooling: str = "bilinear",
        sketch_dim: int = 8192,
        sketch_seed: int = 0,
        drop_rate: float = 0.2,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling '{pooling}': choose one of {', '.join(POOLINGS)}")
        self.in_channels = tuple(in_channels)
        self.reduce = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, reduce_dim, 1, bias=False), nn.BatchNorm2d(reduce_dim), nn.ReLU(inplace=True))
            if reduce_dim
            else nn.Identity()
            for c in self.in_channels
        )
        dims = [reduce_dim or c for c in self.in_channels]
        c1, c2 = dims[0], dims[-1]
        if pooling == "bilinear":
            if c1 * c2 > MAX_DESCRIPTOR:
                raise ConfigError(
                    f"bilinear pooling of {c1}x{c2} channels gives a {c1 * c2:,}-dim descriptor "
                    f"({c1 * c2 * num_classes:,} classifier weights): set reduce_dim (e.g. 256) or use cbcnn"
                )
            self.pool, self.descriptor_dim = BilinearPool(), c1 * c2
        else:
            cls = TensorSketchPool if pooling == "tensor_sketch" else RandomMaclaurinPool
            self.pool, self.descriptor_dim = cls(c1, c2, sketch_dim, sketch_seed), sketch_dim
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.descriptor_dim, num_classes)

    def descriptor(self, maps: torch.Tensor) -> torch.Tensor:
        streams = [r(m) for r, m in zip(self.reduce, maps.split(self.in_channels, dim=1), strict=True)]
        return self.pool(streams[0], streams[-1])

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.descriptor(maps)))


class BCNN(FGVCModel):
    cacheable = True  # the bilinear descriptor's inputs depend on the image only

    def __init__(
        self,
        num_classes: int,
        layers: tuple[int | str, ...] = ("final",),
        reduce_dim: int | None = 256,
        pooling: str = "bilinear",
        sketch_dim: int = 8192,
        sketch_seed: int = 0,
        drop_rate: float = 0.2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 1 <= len(layers) <= 2:
            raise ConfigError(f"layers must name one (symmetric) or two (two-stream) feature maps, got {layers}")
        stages = len(self.backbone.feature_info)
        for layer in layers:
            if layer != "final" and not (isinstance(layer, int) and 0 <= layer < stages):
                raise ConfigError(f"layer {layer!r} is neither 'final' nor a stage index 0..{stages - 1}")
        self.layers = tuple(layers)
        self.feature_spec = f"maps:{','.join(map(str, self.layers))}"
        channels = tuple(
            self.backbone.num_features if layer == "final" else self.backbone.feature_info[layer]["num_chs"]
            for layer in self.layers
        )
        self.head = BilinearHead(channels, num_classes, reduce_dim, pooling, sketch_dim, sketch_seed, drop_rate)

    @property
    def descriptor_dim(self) -> int:
        return self.head.descriptor_dim

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """The streams' maps at the deepest stream's size, concatenated on channels."""
        if self.layers == ("final",):
            return self.backbone.forward_features(x)
        stages = [layer for layer in self.layers if layer != "final"]
        final, intermediates = self.backbone.forward_intermediates(x, indices=stages)
        by_layer = dict(zip(stages, intermediates, strict=True)) | {"final": final}
        maps = [by_layer[layer] for layer in self.layers]
        # Pool shallower maps by their (constant) stride ratio to the deepest one: exports to ONNX, unlike
        # adaptive pooling to a traced size; ceil_mode matches the backbone's 'same'-padded downsampling.
        deepest = max(self._reduction(layer) for layer in self.layers)
        maps = [
            F.avg_pool2d(m, k, k, ceil_mode=True) if (k := deepest // self._reduction(layer)) > 1 else m
            for layer, m in zip(self.layers, maps, strict=True)
        ]
        return torch.cat(maps, dim=1)

    def _reduction(self, layer: int | str) -> int:
        return self.backbone.feature_info[-1 if layer == "final" else layer]["reduction"]

    @property
    def export_blocker(self) -> str | None:
        if isinstance(self.head.pool, TensorSketchPool):
            return (
                "compact bilinear pooling with Tensor Sketch uses FFT, which ONNX cannot express. Train the "
                "exportable variant, Random Maclaurin: finegrain train --method cbcnn --model-kwargs pooling=rm"
            )
        return None


@register_model("bcnn")
def bcnn(num_classes: int, **kwargs) -> BCNN:
    """Bilinear CNN: full bilinear pooling after a 1×1 channel reduction."""
    return BCNN(num_classes=num_classes, **kwargs)


@register_model("cbcnn")
def cbcnn(num_classes: int, pooling: str = "tensor_sketch", **kwargs) -> BCNN:
    """Compact bilinear CNN: Tensor Sketch (default) or exportable Random Maclaurin (``pooling="rm"``)."""
    if pooling == "bilinear":
        raise ConfigError("cbcnn is compact pooling: use pooling tensor_sketch or rm (or the method bcnn)")
    return BCNN(num_classes=num_classes, pooling=pooling, **kwargs)
