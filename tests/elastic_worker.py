"""Run under torchrun by test_shards.py's two-node test: train from shards, then save this rank's weights."""

import os
import sys
from pathlib import Path

import torch

from finegrain.config import TrainConfig
from finegrain.engine.train import fit

data, out = sys.argv[1], Path(sys.argv[2])
cfg = TrainConfig().replace(
    data=data, input_size=64, epochs=2, batch_size=4, workers=0, amp="none", freeze_backbone=False,
    cache_dir=str(out / "cache"), run_dir=str(out / "run"), lr=1e-3, cache_features=False,
)  # fmt: skip
result = fit(cfg)
torch.save(result.model.state_dict(), out / f"rank{os.environ['RANK']}.pt")
