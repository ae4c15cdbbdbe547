"""SR augmentation: some training images are reduced by the super-resolution model's scale and restored by it,
so the classifier learns what restored small photos look like (``finegrain sr train`` makes the model)."""

from __future__ import annotations

from collections.abc import Callable

from torchvision.transforms import v2

from finegrain.config import TrainConfig
from finegrain.engine.addons.base import AddOn
from finegrain.engine.sr import load_sr
from finegrain.models.sr import SRAugment


class SRAugAddOn(AddOn):
    name = "sr_aug"

    @classmethod
    def wanted(cls, cfg: TrainConfig) -> bool:
        return cfg.sr.sr_aug > 0

    def train_transform(self, transform: Callable) -> Callable:
        # before the crop, at the image's own size: a low-resolution photo, restored
        return v2.Compose([SRAugment(load_sr(self.cfg.sr.sr_model), self.cfg.sr.sr_aug), transform])
