"""The frozen-backbone fast path: compute backbone features once, cache them, train only the head.

A cache entry is keyed by the backbone's weights, the preprocessing, the view (plain or mirrored) and
every file's path, size and mtime, so any change to data or model computes fresh features.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.transforms import functional as TF
from tqdm import tqdm

from finegrain.data import ImageDataset, Sample
from finegrain.data.transforms import Preprocess, eval_transform
from finegrain.engine.checkpoint import save_atomic
from finegrain.engine.evaluate import autocast, to_device


def _state_digest(module: nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(model: nn.Module, samples: Sequence[Sample], pre: Preprocess, flip: bool) -> str:
    files = [(str(s.path.resolve()), s.path.stat().st_size, s.path.stat().st_mtime_ns) for s in samples]
    backbone = [type(model.backbone).__name__, _state_digest(model.backbone)]
    payload = json.dumps([*backbone, model.feature_spec, pre.to_dict(), flip, files])
    return hashlib.sha1(payload.encode()).hexdigest()[:20]


class _Mirrored:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return self.transform(TF.hflip(img))


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    samples: Sequence[Sample],
    pre: Preprocess,
    device: torch.device,
    flip: bool = False,
    batch_size: int = 64,
    workers: int = 2,
    amp: str = "none",
    channels_last: bool = False,
    cache_dir: str | Path | None = None,
    desc: str = "features",
) -> torch.Tensor:
    """``model.backbone_features`` of ``samples`` in order, from the cache when the same inputs were seen."""
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / "features" / f"{cache_key(model, samples, pre, flip)}.pt"
        if cache_file.is_file():
            return torch.load(cache_file, map_location="cpu", weights_only=True)["features"]
    transform = eval_transform(pre)
    dataset = ImageDataset(samples, _Mirrored(transform) if flip else transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    model.eval()
    chunks = []
    for x, _ in tqdm(loader, desc=desc + (" (mirrored)" if flip else ""), unit="batch"):
        x = to_device(x, device, channels_last)
        with autocast(device, amp):
            chunks.append(model.backbone_features(x).float().cpu())
    features = torch.cat(chunks)
    if cache_file is not None:
        save_atomic({"features": features}, cache_file)
    return features
