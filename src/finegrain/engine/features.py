"""The frozen-backbone fast path: compute backbone features once, cache them, train only the head.

A cache entry is keyed by the backbone's weights, the preprocessing, the view (plain or mirrored), the precision
and every file's path, size and mtime, so any change to data or model computes fresh features.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.transforms import functional as TF
from tqdm import tqdm

from finegrain.checkpoint import save_atomic
from finegrain.data import ImageDataset, Sample
from finegrain.data.transforms import Preprocess, eval_transform
from finegrain.engine.evaluate import autocast, to_device
from finegrain.env import resolve_amp
from finegrain.torchfile import load_tensors


def _state_digest(module: nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(model: nn.Module, samples: Sequence[Sample], pre: Preprocess, flip: bool, precision: str = "none") -> str:
    """Everything the features depend on: the backbone's weights, the preprocessing, the view, the precision they
    were computed in, and each file's path, size and modification time."""
    files = [(str(s.path.resolve()), s.path.stat().st_size, s.path.stat().st_mtime_ns) for s in samples]
    backbone = [type(model.backbone).__name__, _state_digest(model.backbone)]
    payload = json.dumps([*backbone, model.feature_spec, pre.to_dict(), flip, precision, files])
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
    amp: str = "auto",
    channels_last: bool = False,
    cache_dir: str | Path | None = None,
    desc: str = "features",
) -> torch.Tensor:
    """``model.backbone_features`` of ``samples`` in order, from the cache when the same inputs were seen.

    A cache entry that cannot be read (a disk error, a killed writer on a filesystem without atomic rename) is
    reported and computed again; a cache folder that cannot be written is reported and skipped."""
    cache_file = None
    if cache_dir is not None:
        key = cache_key(model, samples, pre, flip, resolve_amp(amp, device))
        cache_file = Path(cache_dir) / "features" / f"{key}.pt"
        cached = _read_cache(cache_file, len(samples))
        if cached is not None:
            return cached
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
        try:
            save_atomic({"features": features}, cache_file)
        except OSError as e:
            message = f"feature cache not written ({e.strerror}: {cache_file.parent}); training goes on without it"
            warnings.warn(message + ". Point --cache-dir (or FINEGRAIN_CACHE) at a writable folder.", stacklevel=2)
    return features


def _read_cache(path: Path, count: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        features = load_tensors(path, "feature cache entry")["features"]
        if isinstance(features, torch.Tensor) and len(features) == count:
            return features
        reason = "it holds features of another number of images"
    except Exception as e:  # noqa: BLE001 - any unreadable entry is rebuilt the same way
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    warnings.warn(f"feature cache entry {path} is damaged ({reason}): computing it again", stacklevel=3)
    return None
