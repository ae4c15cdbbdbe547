"""Part-based model from keypoint annotations (the Part-based R-CNN idea in a modern, single-network form).

A localiser on the backbone's last feature map predicts one box per part group (e.g. head, body); each part is
cropped from the image, enlarged to the input size and encoded (by the shared backbone, or its own copy); the
classifier reads the global feature and the part features side by side. At test time no annotation is needed.

The localiser predicts each part's centre as the soft-argmax of a heat-map (a 1x1 conv, softmax over
locations) and its width, height and visibility from the features pooled under that heat-map. Why not plain box
regression from the pooled image feature: the heat-map keeps the "where" that global pooling throws away, is
translation-equivariant (a part seen at one place is found at another), and the soft-argmax is differentiable,
so a box loss trains it directly; why not keypoint heat-maps: a part here is a box around several keypoints, so
the box is the target. Training crops come from the annotated box where the part is visible (with probability
``teacher_forcing``; the classifier learns on clean parts) and otherwise from the localiser's own box, detached
(the classifier also learns on what it will see at test time).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from finegrain.data.parts import CUB_PART_GROUPS, check_part_groups
from finegrain.errors import ConfigError
from finegrain.models.base import FGVCModel
from finegrain.models.regions import crop_resize
from finegrain.models.registry import register_model


class PartLocaliser(nn.Module):
    """Feature map (B, C, h, w) -> part boxes (B, P, 4) in [0, 1], visibility logits (B, P), heat-maps."""

    def __init__(self, channels: int, num_parts: int, min_size: float = 0.05) -> None:
        super().__init__()
        self.min_size = min_size
        self.heat = nn.Conv2d(channels, num_parts, 1)
        self.box = nn.Parameter(torch.zeros(num_parts, channels, 3))  # per part: width, height, visibility
        self.box_bias = nn.Parameter(torch.zeros(num_parts, 3))

    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        maps = maps.float()
        b, _, h, w = maps.shape
        heat = self.heat(maps)
        prob = heat.flatten(2).softmax(-1).view_as(heat)
        xs = (torch.arange(w, device=maps.device, dtype=maps.dtype) + 0.5) / w
        ys = (torch.arange(h, device=maps.device, dtype=maps.dtype) + 0.5) / h
        cx, cy = (prob.sum(2) * xs).sum(-1), (prob.sum(3) * ys).sum(-1)
        # unit-norm pooled features: with raw ones (norm ~50 on lite0) one Adam step moved the size logits by ~2
        # and the sigmoid saturated at the minimum size
        pooled = F.normalize(torch.einsum("bphw,bchw->bpc", prob, maps), dim=-1)
        out = torch.einsum("bpc,pck->bpk", pooled, self.box) + self.box_bias
        size = self.min_size + (1 - self.min_size) * torch.sigmoid(out[..., :2])
        boxes = torch.stack([cx - size[..., 0] / 2, cy - size[..., 1] / 2, cx + size[..., 0] / 2,
                             cy + size[..., 1] / 2], -1).clamp(0, 1)  # fmt: skip
        return boxes, out[..., 2], heat


def centre_heatmap(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, P, 4) boxes -> (B, P, h, w) target distributions: each box centre split bilinearly over the four
    nearest cells, so the expected location (the soft-argmax) of the target is the centre itself."""
    cx, cy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2

    def weights(c: torch.Tensor, n: int) -> torch.Tensor:
        g = (c * n - 0.5).clamp(0, n - 1)
        lo = g.floor().clamp(max=max(n - 2, 0))
        frac = (g - lo)[..., None]
        idx = torch.arange(n, device=c.device)
        return (idx == lo[..., None]) * (1 - frac) + (idx == lo[..., None] + 1) * frac

    return weights(cy, h)[..., :, None] * weights(cx, w)[..., None, :]


def localisation_loss(
    boxes: torch.Tensor, visible_logit: torch.Tensor, heat: torch.Tensor, target: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """For the visible parts: cross-entropy of the heat-map against the true centre (spread over the nearest
    cells: a strong, fast signal for *where*) plus smooth-L1 on (centre, width, height); for all parts:
    visibility cross-entropy."""

    def cxcywh(b: torch.Tensor) -> torch.Tensor:
        return torch.cat([(b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]], -1)

    vis = visible.bool()
    loss = F.binary_cross_entropy_with_logits(visible_logit, vis.float())
    if vis.any():
        h, w = heat.shape[-2:]
        log_p = heat.float().flatten(2).log_softmax(-1)
        where = -(centre_heatmap(target, h, w).flatten(2) * log_p).sum(-1)
        loss = loss + where[vis].mean() + F.smooth_l1_loss(cxcywh(boxes)[vis], cxcywh(target)[vis], beta=0.05)
    return loss


class Parts(FGVCModel):
    feature_spec = "parts"

    def __init__(
        self,
        num_classes: int,
        part_groups: Mapping[str, Sequence[str]] | None = None,
        part_pad: float = 0.1,
        share_encoder: bool = True,
        teacher_forcing: float = 0.5,
        loc_weight: float = 1.0,
        drop_rate: float = 0.2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.part_groups = {k: list(v) for k, v in (part_groups or CUB_PART_GROUPS).items()}
        if not self.part_groups:
            raise ConfigError("parts needs at least one part group, e.g. {'head': ['beak', 'crown']}")
        if not 0 <= teacher_forcing <= 1:
            raise ConfigError(f"parts teacher_forcing is a probability, got {teacher_forcing}")
        self.part_pad, self.teacher_forcing, self.loc_weight = part_pad, teacher_forcing, loc_weight
        num_parts, c = len(self.part_groups), self.backbone.num_features
        self.share_encoder = share_encoder
        if not share_encoder:
            self.part_encoders = self.backbone_copies(num_parts)
        self.localiser = PartLocaliser(c, num_parts)
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(c * (num_parts + 1), num_classes))

    def extra_targets(self, part_names: list[str], data: str) -> dict:
        """Each training image brings the boxes of its annotated parts (checked against the dataset's names)."""
        check_part_groups(self.part_groups, part_names, data)
        return {"part_groups": self.part_groups, "part_names": part_names, "part_pad": self.part_pad}

    def _encode_parts(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(B, P, 4) boxes -> (B, P * C) pooled features of the enlarged crops."""
        b, p, _ = boxes.shape
        if self.share_encoder:  # one backbone pass over all parts' crops
            crops = crop_resize(x.repeat(p, 1, 1, 1), boxes.transpose(0, 1).reshape(-1, 4))
            feats = self.backbone(crops.contiguous(memory_format=torch.channels_last)).view(p, b, -1)
        else:
            feats = torch.stack([enc(crop_resize(x, boxes[:, i])) for i, enc in enumerate(self.part_encoders)])
        return feats.transpose(0, 1).reshape(b, -1)

    def forward(self, x: torch.Tensor, targets: dict | None = None):
        maps = self.backbone.forward_features(x)
        pooled = self.backbone.forward_head(maps)
        boxes, visible_logit, heat = self.localiser(maps)
        crop_boxes = boxes.detach()
        if self.training and targets is not None:
            forced = targets["part_visible"].bool() & (torch.rand(boxes.shape[:2]) < self.teacher_forcing).to(x.device)
            crop_boxes = torch.where(forced[..., None], targets["part_boxes"].to(boxes.dtype), crop_boxes)
        logits = self.head(torch.cat([pooled.float(), self._encode_parts(x, crop_boxes).float()], 1))
        if not self.training:
            return logits
        return {"logits": logits, "boxes": boxes, "visible_logit": visible_logit, "heat": heat, "targets": targets}

    def compute_loss(self, out: dict, y: torch.Tensor, criterion) -> tuple[torch.Tensor, torch.Tensor]:
        loss = criterion(out["logits"].float(), y)
        if out["targets"] is not None and self.loc_weight > 0:
            t = out["targets"]
            loss = loss + self.loc_weight * localisation_loss(
                out["boxes"], out["visible_logit"], out["heat"], t["part_boxes"], t["part_visible"]
            )
        return loss, out["logits"].detach()

    @torch.no_grad()
    def attention_boxes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The located part boxes, one (B, 4) tensor per part group, in [0, 1] of the input."""
        boxes = self.localiser(self.backbone.forward_features(x))[0].cpu()
        return list(boxes.unbind(1))


@register_model("parts")
def parts(num_classes: int, **kwargs) -> Parts:
    """Supervised parts: a localiser trained on annotated part boxes, part crops encoded, global + parts classified."""
    return Parts(num_classes=num_classes, **kwargs)
