"""Structured pruning of whole channels with Torch-Pruning (DepGraph), stored safely in checkpoints.

What is pruned: the expansion channels of inverted-residual blocks (``conv_pw`` -> ``conv_dw`` ->
``conv_pwl``), where most of an EfficientNet/MobileNet's compute lives. Block outputs, the stem, the last
feature conv and the method's head keep their widths, so every method's head (B-CNN streams included) still
fits, and residual connections need no surgery.

A pruned model is recorded as plain numbers (each layer's channel counts, ``structure``) next to its weights,
so checkpoints keep loading with ``weights_only=True``: ``finegrain.models.pruned`` reshapes a freshly built
model from them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from finegrain.checkpoint import Checkpoint
from finegrain.data.calibration import calibration_loader
from finegrain.errors import ConfigError
from finegrain.extras import need


def _expansion_convs(model: nn.Module) -> list[nn.Module]:
    return [b.conv_pw for b in _blocks(model)]


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.backbone.modules() if hasattr(m, "conv_pw") and hasattr(m, "conv_pwl")]


@torch.no_grad()
def _expansion_stats(model: nn.Module, calibration) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per block (keyed by id of its conv_pwl): mean and std over images and positions of each expansion
    channel where it enters the projection conv (after depthwise conv, BN and activation)."""
    sums: dict[int, list] = {}

    def hook(module, args):
        a = args[0].detach().float()
        s = sums.setdefault(id(module), [0.0, 0.0, 0])
        s[0] = s[0] + a.sum((0, 2, 3))
        s[1] = s[1] + a.pow(2).sum((0, 2, 3))
        s[2] += a.numel() // a.shape[1]

    handles = [b.conv_pwl.register_forward_pre_hook(hook) for b in _blocks(model)]
    try:
        model.eval()
        for x, _ in calibration:
            model(x)
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for key, (total, squares, n) in sums.items():
        mean = total / n
        stats[key] = (mean, (squares / n - mean.pow(2)).clamp(min=0).sqrt())
    return stats


class _OutputShareImportance:
    """A channel's share of its block's output variation: ||W_pwl[:, i]|| x std(a_i) over calibration images.

    Weight magnitude alone ignores that BatchNorm rescales channels, so it can rank a channel that carries much
    of the signal as unimportant; this asks what the projection actually receives from each channel."""

    def __init__(self, stats: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.stats = stats

    def __call__(self, group) -> torch.Tensor:
        import torch_pruning as tp

        for dep, idxs in group:
            layer = dep.layer
            if dep.pruning_fn == tp.pruner.function.prune_conv_in_channels and id(layer) in self.stats:
                _, std = self.stats[id(layer)]
                share = layer.weight.detach().flatten(2).norm(dim=(0, 2)) * std
                imp = torch.zeros(len(idxs))
                imp[torch.as_tensor(dep.root_idxs if hasattr(dep, "root_idxs") else idxs)] = share[idxs]
                return imp
        raise RuntimeError("output-share importance: this group has no projection conv")


@torch.no_grad()
def _compensate_means(model: nn.Module, before: dict[int, tuple[torch.Tensor, torch.Tensor]], weights) -> None:
    """Removing a channel also removes its *mean* contribution to the projection conv, which shifts every
    later layer: fold that constant back into the BatchNorm after the projection (its running mean)."""
    for block in _blocks(model):
        key = id(block.conv_pwl)
        if key not in before or not isinstance(block.bn3, nn.modules.batchnorm._BatchNorm):
            continue
        full = weights[key]  # (out, in_full) before pruning
        kept_cols = block.conv_pwl.weight.detach().flatten(1)  # (out, in_kept)
        # find which columns survived: each kept column equals exactly one original column
        match = (kept_cols.T[:, None, :] == full.T[None, :, :]).all(-1).float().argmax(1)
        removed = torch.ones(full.shape[1], dtype=torch.bool)
        removed[match] = False
        mean, _ = before[key]
        block.bn3.running_mean -= full[:, removed] @ mean[removed]


def prune_channels(
    model: nn.Module,
    ratio: float,
    input_size: int,
    importance: str = "activation",
    calibration: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
    """Remove ``ratio`` of the expansion channels of every inverted-residual block, in place.

    ``importance``: "activation" (each channel's share of the block output on ``calibration`` images),
    "magnitude" (L2 norm of each channel group's weights) or "taylor" (|weight x gradient| on ``calibration``).
    With calibration images, the removed channels' mean contribution is folded back into the next BatchNorm.
    """
    need("export", "pruning (torch-pruning)")
    import torch_pruning as tp

    if not 0 < ratio < 1:
        raise ConfigError(f"pruning ratio must be in (0, 1), got {ratio}")
    roots = _expansion_convs(model)
    if not roots:
        raise ConfigError(
            "this backbone has no inverted-residual blocks (conv_pw/conv_pwl) to prune: "
            "pruning supports EfficientNet / MobileNet-style backbones"
        )
    if importance in ("taylor", "activation") and not calibration:
        raise ConfigError(f"{importance} importance needs calibration batches (images with labels)")
    stats = _expansion_stats(model, calibration) if calibration else {}
    weights = {id(b.conv_pwl): b.conv_pwl.weight.detach().flatten(1).clone() for b in _blocks(model)}
    if importance == "taylor":
        imp = tp.importance.TaylorImportance()
    elif importance == "magnitude":
        imp = tp.importance.MagnitudeImportance(p=2)
    elif importance == "activation":
        imp = _OutputShareImportance(stats)
    else:
        raise ConfigError(f"unknown importance '{importance}': choose activation, magnitude or taylor")
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
    if stats:
        _compensate_means(model, stats, weights)
    if model.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model


def prune_checkpoint(ckpt_path, ratio: float, out_path=None, importance: str = "activation", calibration=None) -> dict:
    """Prune a checkpoint's model and save it (a predict-ready checkpoint, to be fine-tuned)."""
    ckpt = Checkpoint.load(ckpt_path)
    model = ckpt.build_model()
    if calibration is None and (importance != "magnitude" or ckpt.config):
        # labelled training images of the checkpoint's run, never its test split
        calibration = list(calibration_loader(ckpt.calibration_samples(64), ckpt.preprocess, batch_size=16))
    before = sum(p.numel() for p in model.parameters())
    prune_channels(model, ratio, ckpt.preprocess.input_size, importance, calibration)
    model.pruned = True
    out = Path(out_path) if out_path else ckpt.path.with_suffix(f".pruned{round(100 * ratio)}.pt")
    Checkpoint.from_model(model, ckpt.classes, config=ckpt.config).save(out)
    after = sum(p.numel() for p in model.parameters())
    return {"path": str(out), "params_before": before, "params_after": after, "config": ckpt.config}
