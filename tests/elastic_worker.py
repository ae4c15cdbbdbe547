"""Run under torchrun by test_shards.py's two-node test: train from shards; with DIE_AT_EPOCH, the process of
rank 1 dies (once, like a lost node) when that epoch begins, after the previous epoch's checkpoint was written."""

import os
import sys
from pathlib import Path

import torch

import finegrain.engine.train as train_module
from finegrain.config import TrainConfig

data, out, run = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
cfg = TrainConfig().replace(
    data=data, input_size=64, epochs=3, batch_size=4, workers=0, amp="none", freeze_backbone=False,
    cache_dir=str(out / "cache"), run_dir=str(out / run), lr=1e-3, cache_features=False,
)  # fmt: skip
die_at = int(os.environ.get("DIE_AT_EPOCH", "-1"))
real_epoch = train_module.train_one_epoch


def dying_epoch(ctx, task, module, loader, optimizer, scheduler, ema, epoch):
    marker = out / "died"
    if epoch == die_at and os.environ["RANK"] == "1" and not marker.exists():
        marker.write_text(f"rank 1 died at the start of epoch {epoch + 1}\n")
        os._exit(17)
    return real_epoch(ctx, task, module, loader, optimizer, scheduler, ema, epoch)


train_module.train_one_epoch = dying_epoch
result = train_module.fit(cfg)
torch.save(result.model.state_dict(), out / f"{run}-rank{os.environ['RANK']}.pt")
