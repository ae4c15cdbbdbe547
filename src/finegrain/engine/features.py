"""The frozen-backbone fast path: compute backbone features once, cache them, train only the head.

The cache holds one store per view: the backbone's weights, the preprocessing, the view (plain or mirrored) and
the precision name a store, and inside it each image is keyed by its file's path, size and mtime. So any change to
model or view uses another store, a changed file is computed afresh, and any subset of images seen before (a split,
a few-shot sample, the seen classes of a zero-shot split) is read back without decoding an image.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from finegrain.checkpoint import save_atomic
from finegrain.data import ImageDataset, Sample
from finegrain.data.transforms import Mirrored, Preprocess, eval_transform
from finegrain.engine.evaluate import autocast, to_device
from finegrain.env import resolve_amp
from finegrain.models.folded import folded
from finegrain.progress import progress_bar
from finegrain.torchfile import load_tensors


def state_digest(module: nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def view_key(model: nn.Module, pre: Preprocess, flip: bool, precision: str = "none") -> str:
    """What a store's features depend on besides the image: backbone weights, method features, view, precision."""
    backbone = [type(model.backbone).__name__, state_digest(model.backbone)]
    return hashlib.sha1(
        json.dumps([*backbone, model.feature_spec, pre.to_dict(), flip, precision]).encode()
    ).hexdigest()[:20]


def file_key(sample: Sample) -> str:
    """The image's file (or shard) by path, size and modification time, and its member in a shard."""
    stat = sample.path.stat()
    key = f"{sample.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{key}#{sample.member[0]}" if sample.member else key


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
    store, keys, known = None, [], {}
    if cache_dir is not None:
        store = Path(cache_dir) / "features" / f"{view_key(model, pre, flip, resolve_amp(amp, device))}.pt"
        keys = [file_key(s) for s in samples]
        known = _read_store(store)
    todo = [i for i in range(len(samples)) if store is None or keys[i] not in known]
    computed = _compute(model, [samples[i] for i in todo], pre, device, flip, batch_size, workers, amp, channels_last,
                        desc) if todo else None  # fmt: skip
    if store is None:
        return computed
    if todo:
        known.update({keys[i]: computed[j] for j, i in enumerate(todo)})
        try:
            save_atomic({"keys": list(known), "features": torch.stack(list(known.values()))}, store)
        except OSError as e:
            message = f"feature cache not written ({e.strerror}: {store.parent}); training goes on without it"
            warnings.warn(message + ". Point --cache-dir (or FINEGRAIN_CACHE) at a writable folder.", stacklevel=2)
    return torch.stack([known[k] for k in keys]) if keys else torch.empty(0)


def _compute(model: nn.Module, samples: Sequence[Sample], pre: Preprocess, device: torch.device, flip: bool,
             batch_size: int, workers: int, amp: str, channels_last: bool, desc: str) -> torch.Tensor:  # fmt: skip
    transform = eval_transform(pre)
    dataset = ImageDataset(samples, Mirrored(transform) if flip else transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    model = frozen_pass(model, lambda m, x: m.backbone_features(x), pre.input_size, device, amp, channels_last)
    chunks = []
    for x, _ in progress_bar(loader, desc=desc + (" (mirrored)" if flip else ""), unit="batch"):
        x = to_device(x, device, channels_last)
        with autocast(device, amp):
            chunks.append(model.backbone_features(x).float().cpu())
    return torch.cat(chunks)


def frozen_pass(model: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor], size: int,
                device: torch.device, amp: str, channels_last: bool) -> nn.Module:  # fmt: skip
    """``model`` for a frozen forward pass, in eval mode and laid out channels-last when asked: in fp32, a copy with
    its BatchNorms folded into their convolutions where that gives the same ``forward(model, x)``
    (``models/folded.py``: lite0 1.4-1.6x faster at 224 px, 1.1-1.5x at 128, on an AVX2-only CPU); in bf16 the model
    itself."""
    model.eval()
    if resolve_amp(amp, device) == "none":
        model = folded(model, forward, torch.randn(2, 3, size, size, device=device))
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _read_store(path: Path) -> dict[str, torch.Tensor]:
    """file key -> features; an unreadable store is reported and started afresh."""
    if not path.is_file():
        return {}
    try:
        record = load_tensors(path, "feature cache entry")
        keys, features = record["keys"], record["features"]
        if isinstance(features, torch.Tensor) and len(features) == len(keys):
            return dict(zip(keys, features, strict=True))
        reason = "its keys and features do not match"
    except Exception as e:  # noqa: BLE001 - any unreadable store is rebuilt the same way
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    warnings.warn(f"feature cache entry {path} is damaged ({reason}): computing it again", stacklevel=3)
    return {}
