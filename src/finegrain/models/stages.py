"""A backbone cut in two at a stage boundary: the frozen lower stages, whose output maps can be cached once, and
the upper stages that keep training on them (partial fine-tuning, ``--train-stages``).

Why at a stage boundary of timm's EfficientNet family (EfficientNet, EfficientNet-Lite, MobileNet): their
``blocks`` are a sequence of stages whose maps shrink stage by stage, so the later the cut, the smaller the map a
training image costs in memory; the lower stages work at high resolution and take most of a forward pass's time
on a CPU, which partial fine-tuning pays once per cached view instead of on every step with its backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from finegrain.errors import ConfigError


def stage_count(backbone: nn.Module) -> int:
    """How many stages the backbone's ``blocks`` has (0: it is not cut at stages here)."""
    parts = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")
    if not all(hasattr(backbone, p) for p in parts) or not isinstance(backbone.blocks, nn.Sequential):
        return 0
    return len(backbone.blocks)


def check_stages(backbone: nn.Module, name: str, train_stages: int, option: str = "--train-stages") -> int:
    """The index of the first trained stage, or a refusal that names the fix (``option``: the flag that asked)."""
    n = stage_count(backbone)
    if not n:
        raise ConfigError(f"{option} cuts the backbone at a stage of timm's EfficientNet family, and '{name}' "
                          "is not one: use tf_efficientnet_lite0/1/2 (or train the whole backbone: "
                          f"{option} 0)")  # fmt: skip
    if not 1 <= train_stages <= n:
        raise ConfigError(f"{option} {train_stages}: '{name}' has {n} stages, so 1 to {n}")
    return n - train_stages


class Lower(nn.Module):
    """The stem and the first ``cut`` stages: image -> the map the upper stages start from."""

    def __init__(self, backbone: nn.Module, cut: int) -> None:
        super().__init__()
        self.conv_stem, self.bn1, self.blocks = backbone.conv_stem, backbone.bn1, backbone.blocks[:cut]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(x)))


class Upper(nn.Module):
    """The remaining stages, the backbone's last convolution and pooling, then ``head``: map -> logits. Shares
    its modules with the model, so training it trains the model, and a checkpoint of the model holds it."""

    def __init__(self, backbone: nn.Module, cut: int, head: nn.Module) -> None:
        super().__init__()
        self.blocks, self.conv_head, self.bn2 = backbone.blocks[cut:], backbone.conv_head, backbone.bn2
        self.pool = backbone.forward_head  # global pooling (+ the backbone's dropout, if any), as backbone(x) has it
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.bn2(self.conv_head(self.blocks(x)))))


def split(backbone: nn.Module, name: str, train_stages: int, head: nn.Module) -> tuple[Lower, Upper]:
    """(lower, upper) with ``upper(lower(x)) == head(backbone(x))``; the lower part's parameters are frozen."""
    cut = check_stages(backbone, name, train_stages)
    lower = Lower(backbone, cut)
    lower.requires_grad_(False)
    return lower, Upper(backbone, cut, head)
