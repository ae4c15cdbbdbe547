"""Run under torchrun by test_ddp.py: train, then save this rank's weights for comparison."""

import os
import sys

import torch

from finegrain.config import TrainConfig
from finegrain.engine.train import fit

data, out = sys.argv[1], sys.argv[2]
cfg = TrainConfig().replace(
    data=data, input_size=64, epochs=2, batch_size=4, workers=0, amp="none", freeze_backbone=False,
    cache_dir=os.path.join(out, "cache"), run_dir=os.path.join(out, "run"), val_fraction=0.25, lr=1e-3,
)  # fmt: skip
result = fit(cfg)
torch.save(result.model.state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
