"""Low-resolution epochs first (``--low-res-share S``): whole-network fine-tuning trains the first S of its planned
epochs on its training crops downsized to ``LOW_RES_SCALE`` of their side, then finishes at full size.

Why: an epoch on smaller crops costs about their area (convolutions), so a budget buys more epochs; the full-size
finish lets the network settle at the size it is tested near (progressive resizing: fast.ai's DAWNBench recipe,
FFCV's ImageNet configs, which ramp 160 -> 192 px and test at 224-256). The crops are downsized in the batch
(antialiased), after every image transform, so the data pipeline, the mirror check and CutMix stay as they are.
``--replan-epochs`` plans with each epoch's cost (``epoch_cost``): the low-resolution epochs' measured time does not
make the full-size ones look cheap. The phase only moves forward (a plan that grows after the finish began does not
send training back to small crops), and travels in ``last.pt`` so ``--resume`` is exact.

Off by default, measured (AMD EPYC Zen 5, 2 cores, 2026-12-05, docs/frontier-tried.md): with a share of 0.75 the
default's 10 minutes lost 12 of 744 validation images over three domains and two seeds (tomato +8 of 120, gtsrb -19
of 420: its 32 px signs on 64 px crops tested 80.6% against 95.0% on seed 0), and flowers17's 30 minutes validated 2
of 102 lower with a share of 0.75 or 0.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finegrain.config import TrainConfig
from finegrain.data.image_sizes import scaled_side
from finegrain.engine.addons.base import AddOn
from finegrain.engine.context import Context

#: the low-resolution crops' side over the training crops' (in 16 px, at least 32): 0.7 of 176 px is 128 px, about
#: half the area
LOW_RES_SCALE = 0.7


def low_res_side(crop: int) -> int:
    return scaled_side(crop, LOW_RES_SCALE)


class LowResAddOn(AddOn):
    name = "low_res"

    @classmethod
    def wanted(cls, cfg: TrainConfig) -> bool:  # whole-network training on images: cached maps are fixed in size
        return bool(cfg.progressive.low_res_share) and not cfg.model.freeze_backbone and not cfg.model.train_stages

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.crop = self.side = 0  # the training crops' side, and the low-resolution one
        self.full_from: int | None = None  # the first full-size epoch, once reached
        self.epoch = 0  # the epoch being trained

    def attach(self, ctx: Context, task) -> None:
        self.crop = self.cfg.model.train_input_size or ctx.model.preprocess.input_size
        self.side = low_res_side(self.crop)

    def _low(self, epoch: int, planned: int | None = None) -> bool:
        """Is epoch ``epoch`` on small crops: one ``epoch_start`` has seen (``planned`` None), or one to come under a
        plan of ``planned`` epochs."""
        if self.full_from is not None:
            return epoch < self.full_from
        return planned is None or epoch < round(self.cfg.progressive.low_res_share * planned)

    def epoch_start(self, ctx: Context, task, epoch: int) -> bool:
        self.epoch = epoch
        if self.full_from is None and not self._low(epoch, ctx.planned_epochs):
            self.full_from = epoch
            before = f"epochs 1-{epoch} on {self.side} px" if epoch else "no epoch of the plan left for small crops"
            ctx.log(f"--low-res-share: epoch {epoch + 1} of {ctx.planned_epochs} on {self.crop} px crops ({before})")
        return False

    def epoch_info(self, epoch: int) -> dict:
        return {"train_crop": self.side if self._low(epoch) else self.crop}

    def epoch_cost(self, epoch: int, planned: int) -> float:
        return (self.side / self.crop) ** 2 if self._low(epoch, planned) else 1.0

    def batch(self, x: torch.Tensor, images: bool) -> torch.Tensor:
        if not images or not self._low(self.epoch):
            return x
        size = [max(1, round(s * self.side / self.crop)) for s in x.shape[-2:]]
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        small = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return small.contiguous(memory_format=layout)

    def state_dict(self) -> dict:
        return {"full_from": self.full_from}

    def load_state_dict(self, state: dict) -> None:
        """The phase only moves forward: a resumed run's ``epoch_start`` may already have seen the finish begin."""
        if state.get("full_from") is not None:
            self.full_from = state["full_from"]
