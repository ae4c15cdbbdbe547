"""Style add-ons: Fourier amplitude mix on training images, MixStyle on early feature maps.

Both change what a photo's colours, light and texture look like and keep its shapes and parts, against the
lighting and background shifts between training and use (``finegrain.data.augment`` has the operations).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from finegrain.config import TrainConfig
from finegrain.data.augment import MixStyle, fourier_mix_batch
from finegrain.engine.addons.base import AddOn
from finegrain.engine.context import Context
from finegrain.errors import ConfigError


class FourierMixAddOn(AddOn):
    name = "fourier_mix"

    @classmethod
    def wanted(cls, cfg: TrainConfig) -> bool:
        return cfg.style.fourier_mix > 0

    def batch(self, x: torch.Tensor, images: bool) -> torch.Tensor:
        return fourier_mix_batch(x, self.cfg.style.fourier_mix, self.cfg.style.fourier_beta) if images else x


class MixStyleAddOn(AddOn):
    """MixStyle after early backbone stages (where feature statistics carry style, not class), in training
    only; forward hooks, so checkpoints and the evaluated model are unchanged."""

    name = "mixstyle"
    STAGES = (1, 2)

    @classmethod
    def wanted(cls, cfg: TrainConfig) -> bool:
        return cfg.style.mixstyle > 0

    def prepare(self, ctx: Context) -> None:
        self.add_to(ctx.model, self.cfg.style.mixstyle)

    @classmethod
    def add_to(cls, model: nn.Module, p: float) -> None:
        if not hasattr(model.backbone, "feature_info"):
            raise ConfigError("--mixstyle mixes the statistics of one backbone's early stages, and a concatenated "
                              "backbone has several: drop --mixstyle or use one backbone")  # fmt: skip
        mixstyle = MixStyle(p)
        model.mixstyle = mixstyle  # a submodule, so train()/eval() switch it (it has no weights)
        info = model.backbone.feature_info
        for i in cls.STAGES:
            if i < len(info):
                module = model.backbone.get_submodule(info[i]["module"])
                module.register_forward_hook(lambda _m, _inp, out: mixstyle(out))
