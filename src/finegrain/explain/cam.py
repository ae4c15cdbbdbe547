"""Where the model looked: Grad-CAM for PyTorch models, occlusion sensitivity for ONNX Runtime models.

Grad-CAM (Selvaraju et al. 2017) weights an activation by the spatially averaged gradient of the class score:
by default the backbone's last spatial activation, so it works for every CNN method without method-specific
code; a method may name another layer (``FGVCModel.explain_layer``), as token backbones do. ONNX Runtime gives no
gradients, so exported models are explained by occlusion: how much the class probability drops when each
cell of a grid is replaced by the mean colour.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def _last_spatial_activation(backbone: nn.Module):
    """Forward hooks that keep the last 4-D activation with a spatial extent (> 1×1) the backbone produces:
    the map the classifier sees, for any timm CNN and for methods that call the backbone their own way.
    Only the first pass over the full image counts (RA-CNN runs the backbone again on its zoomed crops)."""
    found: dict[str, torch.Tensor] = {}
    passes = [0]
    leaves = [m for m in backbone.modules() if not list(m.children())]

    def hook(_module, _inputs, output):
        spatial = isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1
        if spatial and passes[0] == 1:
            found["map"] = output

    def count_pass(*_):  # the first layer runs again: a new pass over (another) image begins
        passes[0] += 1

    handles = [leaves[0].register_forward_pre_hook(count_pass)]
    handles += [m.register_forward_hook(hook) for m in backbone.modules()]
    return found, handles


def grad_cam(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps in [0, 1] at the input's resolution (B, H, W) and the logits (B, classes).

    ``target`` picks the class per image (default: the predicted class).
    """
    model.eval()
    layer = model.explain_layer()
    if layer is None:
        found, handles = _last_spatial_activation(model.backbone)
    else:  # the method names its layer (e.g. a ViT's final norm: tokens, laid out on the patch grid below)
        found = {}
        handles = [layer.register_forward_hook(lambda _m, _i, output: found.setdefault("map", output))]
    try:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)  # a frozen backbone still passes gradient to its maps
            logits = model(x).float()
            if "map" not in found:
                raise RuntimeError("the backbone produced no spatial feature map to explain")
            target = logits.argmax(1) if target is None else target
            score = logits.gather(1, target.view(-1, 1)).sum()
            activation = found["map"]
            (grads,) = torch.autograd.grad(score, activation)
    finally:
        for h in handles:
            h.remove()
    grads, activation = model.activation_map(grads.float()), model.activation_map(activation.detach().float())
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return normalise(cam), logits.detach()


@torch.inference_mode()
def occlusion(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target: torch.Tensor | None = None, grid: int = 7
) -> tuple[torch.Tensor, torch.Tensor]:
    """Occlusion maps in [0, 1] (B, H, W) and the logits, for any callable model (ONNX Runtime included).

    Each of ``grid``×``grid`` cells is set to 0 (the mean colour after normalisation) in turn; the map is the
    drop of the target class's probability, smoothed by bilinear upsampling.
    """
    logits = fn(x).float()
    target = logits.argmax(1) if target is None else target
    base = logits.softmax(1).gather(1, target.view(-1, 1))
    h, w = x.shape[-2:]
    ys, xs = torch.linspace(0, h, grid + 1).long(), torch.linspace(0, w, grid + 1).long()
    drops = torch.zeros(len(x), grid, grid)
    for i in range(len(x)):
        occluded = x[i].repeat(grid * grid, 1, 1, 1)
        for r in range(grid):
            for c in range(grid):
                occluded[r * grid + c, :, ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = 0
        probs = fn(occluded).float().softmax(1)[:, target[i]]
        drops[i] = (base[i] - probs).clamp(min=0).view(grid, grid)
    cam = F.interpolate(drops[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return normalise(cam), logits


def normalise(cam: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1]; an all-zero map stays zero."""
    flat = cam.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    return ((cam - lo[:, None, None]) / (hi - lo).clamp(min=1e-12)[:, None, None]).clamp(0, 1)
