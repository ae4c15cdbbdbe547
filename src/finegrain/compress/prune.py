"""Structured pruning of whole channels with Torch-Pruning (DepGraph), stored safely in checkpoints.

What is pruned: the expansion channels of inverted-residual blocks (``conv_pw`` -> ``conv_dw`` ->
``conv_pwl``), where most of an EfficientNet/MobileNet's compute lives. Block outputs, the stem, the last
feature conv and the method's head keep their widths, so every method's head (B-CNN streams included) still
fits, and residual connections need no surgery.

A pruned model is recorded as plain numbers (each layer's channel counts, ``structure``) next to its weights,
so checkpoints keep loading with ``weights_only=True``: :func:`apply_structure` reshapes a freshly built model.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from finegrain.errors import ConfigError


def structure(model: nn.Module) -> dict[str, dict[str, int]]:
    """Channel counts of every conv, linear and norm layer."""
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            out[name] = {"in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = {"num_features": m.num_features}
    return out


def apply_structure(model: nn.Module, target: dict[str, dict[str, int]]) -> nn.Module:
    """Resize layers of an unpruned model to ``target`` (weights are then loaded with ``load_state_dict``)."""
    modules = dict(model.named_modules())
    for name, attrs in target.items():
        m = modules.get(name)
        if m is None:
            raise ConfigError(f"pruned structure names layer '{name}', which this model does not have")
        for key, value in attrs.items():
            setattr(m, key, value)
        if isinstance(m, nn.Conv2d):
            shape = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
            m.weight = nn.Parameter(torch.empty(shape))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_channels))
        elif isinstance(m, nn.Linear):
            m.weight = nn.Parameter(torch.empty(m.out_features, m.in_features))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_features))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.weight is not None:
                m.weight, m.bias = nn.Parameter(torch.empty(n)), nn.Parameter(torch.empty(n))
            if m.running_mean is not None:
                m.running_mean, m.running_var = torch.zeros(n), torch.ones(n)
    return model


def _expansion_convs(model: nn.Module) -> list[nn.Module]:
    return [m.conv_pw for m in model.backbone.modules() if hasattr(m, "conv_pw") and hasattr(m, "conv_pwl")]


def prune_channels(
    model: nn.Module,
    ratio: float,
    input_size: int,
    importance: str = "magnitude",
    calibration: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
    """Remove ``ratio`` of the expansion channels of every inverted-residual block, in place.

    ``importance``: "magnitude" (L2 norm of each channel group's weights) or "taylor" (|weight x gradient|,
    from the loss on ``calibration`` batches of (images, labels)).
    """
    import torch_pruning as tp

    if not 0 < ratio < 1:
        raise ConfigError(f"pruning ratio must be in (0, 1), got {ratio}")
    roots = _expansion_convs(model)
    if not roots:
        raise ConfigError(
            "this backbone has no inverted-residual blocks (conv_pw/conv_pwl) to prune: "
            "pruning supports EfficientNet / MobileNet-style backbones"
        )
    if importance == "taylor":
        if not calibration:
            raise ConfigError("taylor importance needs calibration batches (images with labels)")
        imp = tp.importance.TaylorImportance()
    elif importance == "magnitude":
        imp = tp.importance.MagnitudeImportance(p=2)
    else:
        raise ConfigError(f"unknown importance '{importance}': choose magnitude or taylor")
    # Everything that is not an expansion conv or the depthwise conv it feeds keeps its output width.
    prunable = {id(m) for m in roots} | {id(b.conv_dw) for b in model.backbone.modules() if hasattr(b, "conv_pwl")}
    ignored = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear) and id(m) not in prunable]
    model.eval()
    model.requires_grad_(True)  # DepGraph and Taylor scores need gradients, even for a frozen backbone
    example = torch.randn(1, 3, input_size, input_size)
    pruner = tp.pruner.MetaPruner(
        model, example, importance=imp, pruning_ratio=ratio, ignored_layers=ignored, round_to=8
    )
    if importance == "taylor":
        model.zero_grad()
        for x, y in calibration:
            nn.functional.cross_entropy(model(x), y).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    if getattr(model, "freeze_backbone", False):
        model.backbone.requires_grad_(False)
    return model


def prune_checkpoint(ckpt_path, ratio: float, out_path=None, importance: str = "magnitude", calibration=None) -> dict:
    """Prune a checkpoint's model and save it (a predict-ready checkpoint, to be fine-tuned)."""
    from pathlib import Path

    from finegrain.engine.checkpoint import build_model, load_checkpoint, model_record, save_atomic

    ckpt = load_checkpoint(ckpt_path)
    model = build_model(ckpt)
    if importance == "taylor" and calibration is None:
        calibration = _calibration_batches(ckpt_path)
    before = sum(p.numel() for p in model.parameters())
    prune_channels(model, ratio, ckpt["preprocess"]["input_size"], importance, calibration)
    model.pruned = True
    out = Path(out_path) if out_path else Path(ckpt["path"]).with_suffix(f".pruned{round(100 * ratio)}.pt")
    record = model_record(model, ckpt["classes"])
    record["config"] = ckpt.get("config", {})
    save_atomic(record, out)
    after = sum(p.numel() for p in model.parameters())
    return {"path": str(out), "params_before": before, "params_after": after, "config": record["config"]}


def _calibration_batches(ckpt_path, count: int = 64, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Labelled training images of the checkpoint's run, through the evaluation preprocessing."""
    from finegrain.data.transforms import Preprocess
    from finegrain.engine.checkpoint import load_checkpoint
    from finegrain.export.quantize import calibration_loader, calibration_samples

    pre = Preprocess.from_dict(load_checkpoint(ckpt_path)["preprocess"])
    return list(calibration_loader(calibration_samples(ckpt_path, count=count), pre, batch_size))
