"""CutMix (Yun et al. 2019) on training batches: a rectangle of another image of the batch is pasted in and the
labels are mixed by its area (torchvision's ``v2.CutMix``).

Why: whole-network fine-tuning of a few hundred images memorises them within a score of epochs (plantvillage_tomato:
training accuracy 1.00 from epoch ~18 of the default's 38), after which the loss has little left to teach; a pasted
rectangle keeps each part real (unlike MixUp's blend, which ghosts the small local details a fine-grained class
differs in) while the label says how much of each image is in view. ``--cutmix P`` mixes a batch with probability
P; the budget recipe turns it on for long whole-network schedules (``engine/recipe.py``, ``CUTMIX_MIN_EPOCHS``).
Measured on the default's 10-minute runs (AMD EPYC Zen 5, seeds 0-1, docs/frontier.md): tomato 94.33 -> 96.33 test
top-1 on both seeds (+5 of 120 validation images), gtsrb +2 of 420 validation images (test +0.1 and -1.0 pt).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2 as T

from finegrain.config import TrainConfig
from finegrain.engine.addons.base import AddOn, Criterion
from finegrain.engine.context import Context

#: the Beta(alpha, alpha) the pasted area is drawn from: 1.0, uniform, as in the CutMix paper and torchvision
ALPHA = 1.0


class CutMixAddOn(AddOn):
    name = "cutmix"

    @classmethod
    def wanted(cls, cfg: TrainConfig) -> bool:
        return bool(cfg.augment.cutmix)

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.mixing: torch.Tensor | None = None  # this batch's (B, B) mixing of the samples' labels
        self.num_classes = 0

    def attach(self, ctx: Context, task) -> None:
        self.num_classes = len(ctx.index.classes)

    def batch(self, x: torch.Tensor, images: bool) -> torch.Tensor:
        """Mixes ``x`` with probability ``--cutmix``; the mixing matrix is torchvision's one-hot label mix of the
        samples' own positions, so ``criterion`` mixes the real labels the same way whatever partner it chose."""
        self.mixing = None
        if not images or len(x) < 2 or torch.rand(()) >= self.cfg.augment.cutmix:
            return x
        mixed, self.mixing = T.CutMix(alpha=ALPHA, num_classes=len(x))(x, torch.arange(len(x), device=x.device))
        return mixed

    def criterion(self, base: Criterion, x: torch.Tensor, batch: Sequence, images: bool) -> Criterion:
        """The loss against the mixed labels (class probabilities: cross-entropy takes them, label smoothing too)."""
        if self.mixing is None:
            return base
        y = batch[1].to(x.device)
        targets = self.mixing.float() @ torch.nn.functional.one_hot(y, self.num_classes).float()

        def mixed(logits: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            return base(logits, targets)

        return mixed
