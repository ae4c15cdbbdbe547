"""Run under torchrun by test_ddp.py and test_shards.py: train, then save this rank's weights (and the training
images it was given, per epoch) for comparison."""

import json
import os
import sys

import torch

import finegrain.engine.train as train_module
from finegrain.config import TrainConfig
from finegrain.engine.train import fit

data, out = sys.argv[1], sys.argv[2]
cfg = TrainConfig().replace(
    data=data, input_size=64, epochs=2, batch_size=4, workers=0, amp="none", freeze_backbone=False,
    cache_dir=os.path.join(out, "cache"), run_dir=os.path.join(out, "run"), val_fraction=0.25, lr=1e-3,
    cache_features=False,
)  # fmt: skip
seen: list[dict] = []  # per epoch: the training images this rank read (keys) and the batches it trained on
real_epoch = train_module.train_one_epoch


class Counting:
    def __init__(self, loader, record: dict) -> None:
        self.loader, self.record = loader, record

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.record["batches"] += 1
            yield batch


def recording_epoch(ctx, task, module, loader, *args):
    record: dict = {"keys": [], "batches": 0}
    seen.append(record)
    if hasattr(loader.dataset, "samples"):  # listed images: the sampler's order
        record["keys"] = [loader.dataset.samples[i].key for i in loader.sampler]
        return real_epoch(ctx, task, module, Counting(loader, record), *args)
    real_load = loader.dataset.load  # streamed shards: what the stream read

    def load(sample):
        record["keys"].append(sample.key)
        return real_load(sample)

    loader.dataset.load = load
    try:
        return real_epoch(ctx, task, module, Counting(loader, record), *args)
    finally:
        loader.dataset.load = real_load


train_module.train_one_epoch = recording_epoch
result = fit(cfg)
with open(os.path.join(out, f"seen{os.environ['RANK']}.json"), "w") as f:
    json.dump(seen, f)
torch.save(result.model.state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
