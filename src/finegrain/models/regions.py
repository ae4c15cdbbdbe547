"""Image regions as methods use them: crop-and-resize a box, the box around a thresholded map, box IoU.

Boxes are (x0, y0, x1, y1) in [0, 1] of the image they refer to. Every function here is built from ops that
export to ONNX (opset 17) and, for the crop, are differentiable with respect to the box.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Crop ``boxes`` (B, 4) out of ``x`` (B, C, H, W) and resize each to ``size`` x ``size`` (default: the input
    side) by bilinear sampling. The box (0, 0, 1, 1) reproduces ``x`` exactly.

    The sampling grid is built by hand rather than with ``affine_grid``, which ONNX only has from opset 20.
    """
    size = size or x.shape[-1]
    u = (torch.arange(size, device=x.device, dtype=x.dtype) * 2 + 1) / size - 1  # pixel centres in [-1, 1]
    b = boxes.to(x.dtype)
    cx, cy = (b[:, 0] + b[:, 2] - 1)[:, None, None], (b[:, 1] + b[:, 3] - 1)[:, None, None]
    hx, hy = (b[:, 2] - b[:, 0])[:, None, None], (b[:, 3] - b[:, 1])[:, None, None]
    gx = (cx + hx * u[None, None, :]).expand(-1, size, size)
    gy = (cy + hy * u[None, :, None]).expand(-1, size, size)
    return F.grid_sample(x, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border", align_corners=False)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) maps -> (B, H, W), bilinear: the resolution at which regions are thresholded."""
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def threshold_boxes(maps: torch.Tensor, theta: torch.Tensor | float, pad: float = 0.0) -> torch.Tensor:
    """The box around each (B, H, W) map's region at or above ``theta`` (per sample, or one value) times its
    maximum, widened by ``pad`` (a fraction of the side) and kept inside the image. First/last marked rows and
    columns come from ``argmax``, which returns the first maximum (as ONNX ArgMax does by default)."""
    b, h, w = maps.shape
    theta = torch.as_tensor(theta, dtype=maps.dtype, device=maps.device).reshape(-1, 1, 1)
    peak = maps.flatten(1).max(1).values.reshape(b, 1, 1)
    mask = (maps >= theta * peak).to(maps.dtype)
    rows, cols = mask.amax(2), mask.amax(1)  # (B, H), (B, W): does the region reach this row/column?
    y0, x0 = rows.argmax(1), cols.argmax(1)
    y1, x1 = h - rows.flip(1).argmax(1), w - cols.flip(1).argmax(1)  # exclusive ends
    box = torch.stack([x0 / w - pad, y0 / h - pad, x1 / w + pad, y1 / h + pad], 1)
    return box.clamp(0, 1)


def box_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection area of matching rows of two (..., 4) box tensors (x0, y0, x1, y1)."""
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    return (rb - lt).clamp(min=0).prod(-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two (..., 4) box tensors."""
    inter = box_intersection(a, b)
    area = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1) + (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area - inter).clamp(min=1e-12)
