"""Run under torchrun by test_shards.py's two-node tests: train from shards, then save this rank's weights.

With ``FG_TEST_KILL_RANK`` set, that rank kills itself (SIGKILL, as a dying node would) once epoch 1 is saved, in
the first attempt only; torchrun (``--max-restarts``) then starts both workers again."""

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from finegrain.config import TrainConfig
from finegrain.engine.train import fit

data, out, epochs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2
cfg = TrainConfig().replace(
    data=data, input_size=64, epochs=epochs, batch_size=4, workers=0, amp="none", freeze_backbone=False,
    cache_dir=str(out / "cache"), run_dir=str(out / "run"), lr=1e-3, cache_features=False,
)  # fmt: skip
victim = os.environ.get("FG_TEST_KILL_RANK")


def die_after_first_epoch(row: dict) -> None:
    if victim is None or row["epoch"] != 1 or (out / "killed").exists():  # the first attempt only
        return
    dist.barrier()  # rank 0 has written last.pt
    if os.environ["RANK"] == victim:
        (out / "killed").write_text(f"rank {victim} after epoch 1\n")
        os.kill(os.getpid(), signal.SIGKILL)


result = fit(cfg, on_epoch=die_after_first_epoch)
torch.save(result.model.state_dict(), out / f"rank{os.environ['RANK']}.pt")
