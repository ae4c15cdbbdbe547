"""Progressive training: stages run one after another, each with its input size, its jigsaw grid (PMG: shuffle
n x n patches of each training image) and method settings (``FGVCModel.STAGE_SETTINGS``)."""

from __future__ import annotations

from dataclasses import replace

import torch

from finegrain.config import TrainConfig
from finegrain.data.augment import jigsaw
from finegrain.engine.addons.base import AddOn
from finegrain.engine.context import Context
from finegrain.engine.task import image_datasets


class ProgressiveAddOn(AddOn):
    name = "progressive"

    @classmethod
    def wanted(cls, cfg: TrainConfig) -> bool:
        return bool(cfg.progressive.stages)

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.stage: int | None = None
        self.jigsaw = 1
        self.base_preprocess = None

    def epoch_start(self, ctx: Context, task, epoch: int) -> bool:
        stage = self.cfg.progressive.stage_at(epoch)
        if stage == self.stage:
            return False
        self.stage = stage
        stages, model = self.cfg.progressive.stages, ctx.model
        self.base_preprocess = self.base_preprocess or model.preprocess
        size = stages[stage].get("input_size") or self.base_preprocess.input_size
        model.preprocess = replace(self.base_preprocess, input_size=size)
        task.train_set, task.val_set = image_datasets(ctx)
        self.jigsaw = stages[stage].get("jigsaw", 1)
        for i in range(stage + 1):  # every stage up to this one: a run resumed mid-stage is set up as it was
            model.configure(**stages[i].get("model", {}))
        ctx.log(f"stage {stage + 1}/{len(stages)}: input {size} px, jigsaw {self.jigsaw}x{self.jigsaw}, "
                f"method settings {stages[stage].get('model', {})}")  # fmt: skip
        return True

    def epoch_info(self, epoch: int) -> dict:
        return {"stage": self.cfg.progressive.stage_at(epoch) + 1}

    def batch(self, x: torch.Tensor, images: bool) -> torch.Tensor:
        return jigsaw(x, self.jigsaw) if self.jigsaw > 1 else x
