"""Center loss (Wen et al. 2016) on whatever the classifier (``model.head``) reads, captured by a hook, so it
works for any method and on both the cached-feature and the image path."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from finegrain.config import TrainConfig
from finegrain.engine.addons.base import AddOn, Criterion
from finegrain.engine.context import Context
from finegrain.errors import ConfigError
from finegrain.losses import CenterLoss


class CenterLossAddOn(AddOn):
    name = "center"

    @classmethod
    def wanted(cls, cfg: TrainConfig) -> bool:
        return cfg.center.center_loss > 0

    def attach(self, ctx: Context, task) -> None:
        self.head_input: dict[str, torch.Tensor] = {}
        ctx.model.head.register_forward_pre_hook(lambda _m, args: self.head_input.__setitem__("x", args[0]))
        sample = task.train_set[0][0][None].to(ctx.device)
        with torch.enable_grad():
            task.trainable.eval()(task.as_input(sample, self.cfg))
        if not self.head_input["x"].requires_grad:
            raise ConfigError(
                "--center-loss pulls the features the classifier reads, but with a frozen backbone they cannot move "
                f"(for '{self.cfg.model.method}' they are the backbone's output), so it would change nothing: add "
                "--no-freeze-backbone, or use a method whose features train (wsdan has center loss built in)"
            )
        dim = self.head_input.pop("x")[0].numel()  # (drop the sample's graph)
        self.center = CenterLoss(len(ctx.index.classes), dim, self.cfg.center.center_beta).to(ctx.device)

    def criterion(self, base: Criterion, x: torch.Tensor, batch: Sequence, images: bool) -> Criterion:
        weight = self.cfg.center.center_loss

        def with_center(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return base(logits, target) + weight * self.center(self.head_input["x"], target)

        return with_center

    def state_dict(self) -> dict:
        return self.center.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.center.load_state_dict(state)
