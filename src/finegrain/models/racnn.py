"""Recurrent Attention CNN (Fu et al., CVPR 2017): look, zoom into the attended region, look again.

Each scale classifies its input and an attention proposal network (APN) picks a square region (centre tx, ty;
half side tl) of it; the next scale sees that region enlarged to the full input size by a differentiable affine
zoom (``grid_sample``), so the next scale's confidence sends gradient into (tx, ty, tl). A pairwise ranking loss
pushes each finer scale to be more confident in the true class than the coarser one.

Training first runs ``apn_start`` classification steps (the APN's ranking signal means nothing before the
classifiers know the classes), then alternates (``alternate`` steps each): classification steps train the
backbones and classifiers with cross-entropy at every scale (regions fixed), APN steps train the APNs with the
ranking loss only (classifiers fixed). The APN starts on the region of highest response of the last feature
map for the predicted class (its class activation map) and learns offsets from there: the paper's
initialisation, done in closed form. Each zoom is at least 2x (``max_half``) and at most 5x (``min_half``).

``scale_size`` lets the zooms add detail: with an input larger than it (e.g. ``input_size`` 448,
``scale_size`` 224) the first scale sees the whole image reduced to ``scale_size`` and every zoom crops its
region from the full-resolution input. Without it, a zoom only enlarges pixels the first scale already saw.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from finegrain.errors import ConfigError
from finegrain.losses import pairwise_ranking_loss
from finegrain.models.base import FGVCModel
from finegrain.models.regions import crop_resize
from finegrain.models.registry import register_model


def zoom(x: torch.Tensor, boxes: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Crop square ``boxes`` (B, 3: centre x, centre y in [-1, 1]; half side in (0, 1], all in the normalised
    coordinates of ``x``) and resize each to ``size`` (default: the input size) by bilinear sampling.

    Differentiable with respect to the boxes; the box (0, 0, 1) reproduces ``x`` exactly.
    """
    cx, cy, half = boxes.unbind(1)
    return crop_resize(x, (torch.stack([cx - half, cy - half, cx + half, cy + half], 1) + 1) / 2, size)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The box ``inner`` (given in the frame of the zoom ``outer``) in the frame ``outer`` lives in."""
    cx, cy, half = outer.unbind(1)
    return torch.stack([cx + half * inner[:, 0], cy + half * inner[:, 1], half * inner[:, 2]], 1)


def peak_boxes(energy: torch.Tensor, half: float = 0.5) -> torch.Tensor:
    """A box of half side ``half`` centred on each (B, h, w) map's strongest location, moved inside the image."""
    b, h, w = energy.shape
    idx = energy.detach().float().flatten(1).argmax(1)
    cy = ((idx // w).float() + 0.5) / h * 2 - 1
    cx = ((idx % w).float() + 0.5) / w * 2 - 1
    limit = 1 - half
    return torch.stack([cx.clamp(-limit, limit), cy.clamp(-limit, limit), torch.full_like(cx, half)], 1)


@contextmanager
def _without_grad(modules: list[nn.Module]):
    """Parameters of ``modules`` take no gradient inside the block (the graph is built without them)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _atanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.log((1 + x) / (1 - x))  # torch.atanh has no ONNX export


class APN(nn.Module):
    """Attention proposal: offsets from the peak box, predicted from the scale's pooled features.

    The half side stays in [min_half, max_half] (normalised units; 1 = the whole image): with max_half 0.5
    every scale is at least a 2x zoom, so the APN cannot dodge the ranking loss by zooming out to the whole
    image (measured on the patch task: unbounded, boxes grew to 97% of the image).
    """

    def __init__(self, channels: int, hidden: int = 512, min_half: float = 0.2, max_half: float = 0.5) -> None:
        super().__init__()
        if not 0 < min_half < max_half <= 1:
            raise ConfigError(f"racnn needs 0 < min_half < max_half <= 1, got {min_half}, {max_half}")
        self.min_half, self.max_half = min_half, max_half
        start = (0.5 * (min_half + max_half) - min_half) / (max_half - min_half)
        self.half_logit = float(torch.logit(torch.tensor(start)))
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.Tanh(), nn.Linear(hidden, 3))
        nn.init.zeros_(self.net[-1].weight)  # start exactly on the peak box
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, maps: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
        """``cam``: the scale's class activation map (B, h, w) for its predicted class; the box starts on its peak."""
        start = peak_boxes(cam)
        d = self.net(maps.mean((2, 3)).float())
        half = self.min_half + (self.max_half - self.min_half) * torch.sigmoid(self.half_logit + d[:, 2])
        limit = 1 - half
        # centres move in tanh space so the box always stays inside the image
        cx = limit * torch.tanh(_atanh((start[:, 0] / limit).clamp(-0.999, 0.999)) + d[:, 0])
        cy = limit * torch.tanh(_atanh((start[:, 1] / limit).clamp(-0.999, 0.999)) + d[:, 1])
        return torch.stack([cx, cy, half], 1)


def _steps_default(state: dict, prefix: str, *_args) -> None:
    """Checkpoints written before the step counter was saved load with the schedule at its start."""
    state.setdefault(prefix + "steps", torch.zeros((), dtype=torch.long))


class RACNN(FGVCModel):
    feature_spec = "racnn"
    has_unused_parameters = True  # alternating steps leave either the APNs or the classifiers without gradient

    def __init__(
        self,
        num_classes: int,
        scales: int = 2,
        share_backbone: bool = True,
        min_half: float = 0.2,
        max_half: float = 0.5,
        apn_hidden: int = 512,
        margin: float = 0.05,
        alternate: int = 1,
        apn_start: int = 200,
        fuse: str | list[int] = "all",
        scale_size: int | None = None,
        drop_rate: float = 0.2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if scales not in (2, 3):
            raise ConfigError(f"racnn scales must be 2 or 3, got {scales}")
        self.scales = scales
        self.scale_size = scale_size
        self.fuse = list(range(scales)) if fuse == "all" else [int(s) for s in fuse]
        if not self.fuse or any(not 0 <= s < scales for s in self.fuse):
            raise ConfigError(f"racnn fuse must be 'all' or scale indices in 0..{scales - 1}, got {fuse}")
        self.margin, self.alternate, self.apn_start = margin, max(1, alternate), apn_start
        # training forward passes so far (APN steps begin after ``apn_start`` of them): a buffer, so checkpoints
        # and --resume carry the alternation schedule on where it was
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._register_load_state_dict_pre_hook(_steps_default)
        self.share_backbone = share_backbone
        self.extra_backbones = nn.ModuleList() if share_backbone else self.backbone_copies(scales - 1)
        c = self.backbone.num_features
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Dropout(drop_rate), nn.Linear(c, num_classes)) for _ in range(scales)
        )
        self.head = self.heads[0]  # FGVCModel's "head": the first scale's classifier
        self.apns = nn.ModuleList(APN(c, apn_hidden, min_half, max_half) for _ in range(scales - 1))

    def adapt_weights(self, method: str, state_dict: dict) -> bool:
        """Start from a trained ``baseline`` of the same backbone and classes (``--init-from``): its backbone
        for every scale and its classifier for every scale's classifier, so RA-CNN begins where the baseline
        ends and the zooms only have to add to it."""
        if method != "baseline":
            return False
        backbone = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
        for net in [self.backbone, *self.extra_backbones]:
            net.load_state_dict(backbone, strict=True)
        for head in self.heads:
            head.load_state_dict({k.removeprefix("head."): v for k, v in state_dict.items() if k.startswith("head.")})
        return True

    def _backbone(self, s: int) -> nn.Module:
        return self.backbone if s == 0 or self.share_backbone else self.extra_backbones[s - 1]

    def forward_scales(self, x: torch.Tensor, apn_step: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Logits of every scale and the regions (B, 3) of the input that scales 2.. saw (each zoom's box,
        predicted in the previous view's frame, composed into the input's frame).

        ``apn_step``: the classification parameters are held fixed (no gradient), the zooms carry gradient
        into the APNs; otherwise the zooms are fixed and everything else learns.
        """
        size = self.scale_size or x.shape[-1]
        view = x if size == x.shape[-1] else self._reduce(x, size)
        fixed = [self.backbone, self.heads, self.extra_backbones]
        with _without_grad(fixed if apn_step else []):
            logits, regions = [], []
            for s in range(self.scales):
                net = self._backbone(s)
                maps = net.forward_features(view)
                logits.append(self.heads[s](net.forward_head(maps)))
                if s + 1 < self.scales:
                    box = self.apns[s](maps, self._cam(s, maps, logits[-1]))
                    box = box if apn_step else box.detach()
                    regions.append(compose(regions[-1], box) if regions else box)
                    view = zoom(x, regions[-1], size)  # always from the full-resolution input: one resampling
        return logits, regions

    @staticmethod
    def _reduce(x: torch.Tensor, size: int) -> torch.Tensor:
        """The whole input at ``size``: an exact box average when the input is a multiple of it (exports as a
        pooling), else bilinear."""
        if x.shape[-1] % size == 0 and x.shape[-2] % size == 0:
            return F.adaptive_avg_pool2d(x, size)
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

    def _cam(self, s: int, maps: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Class activation map of the predicted class: the classifier reads average-pooled maps, so its
        weights applied per location say where the evidence for that class is."""
        weight = self.heads[s][-1].weight[logits.argmax(1)]
        return torch.einsum("bchw,bc->bhw", maps.detach().float(), weight.detach().float())

    def forward(self, x: torch.Tensor):
        if not self.training:
            logits, _ = self.forward_scales(x)
            return self.fused(logits)
        steps = int(self.steps)
        apn_step = steps >= self.apn_start and bool(((steps - self.apn_start) // self.alternate) % 2)
        self.steps += 1
        logits, regions = self.forward_scales(x, apn_step=apn_step)
        return {"scale_logits": logits, "regions": regions, "apn_step": apn_step}

    def fused(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """The prediction: the mean of the chosen scales' logits (``fuse``)."""
        return torch.stack([logits[s] for s in self.fuse]).mean(0)

    def compute_loss(self, out: dict, y: torch.Tensor, criterion) -> tuple[torch.Tensor, torch.Tensor]:
        logits = out["scale_logits"]
        fused = self.fused(logits).detach()
        if out["apn_step"]:
            probs = [lg.float().softmax(1).gather(1, y[:, None])[:, 0] for lg in logits]
            loss = sum(pairwise_ranking_loss(probs[s], probs[s + 1], self.margin) for s in range(self.scales - 1))
        else:
            loss = sum(criterion(lg.float(), y) for lg in logits)
        return loss, fused

    @torch.no_grad()
    def attention_boxes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each zoom's region in the *input image's* normalised [0, 1] coordinates: (B, 4) x0, y0, x1, y1."""
        out = []
        for region in self.forward_scales(x)[1]:
            cx, cy, half = region.float().cpu().unbind(1)
            out.append((torch.stack([cx - half, cy - half, cx + half, cy + half], 1) + 1) / 2)
        return out


@register_model("racnn")
def racnn(num_classes: int, **kwargs) -> RACNN:
    """RA-CNN: 2 or 3 scales, APN zooms, inter-scale ranking loss, alternating training."""
    return RACNN(num_classes=num_classes, **kwargs)
