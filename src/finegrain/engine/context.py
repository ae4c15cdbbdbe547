"""What one training run holds while it is set up and trained: passed to the task builders and the add-ons."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from finegrain.config import TrainConfig
from finegrain.data import DatasetIndex
from finegrain.engine.distributed import DistInfo
from finegrain.progress import say


@dataclass
class Context:
    cfg: TrainConfig
    device: torch.device
    info: DistInfo
    run_dir: Path
    index: DatasetIndex
    model: nn.Module
    amp: str  # the precision this run computes in ("bf16" or "none"), resolved from cfg.speed.amp
    addons: list = field(default_factory=list)  # finegrain.engine.addons.AddOn, in hook order
    planned_epochs: int = 0  # the epochs the schedule plans now (``--replan-epochs`` changes it after each epoch)

    def log(self, message: str) -> None:
        if self.info.is_main:
            say(message)
