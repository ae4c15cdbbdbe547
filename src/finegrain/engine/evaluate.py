"""Evaluation: top-1, top-5 and mean per-class accuracy from a confusion matrix that sums across ranks."""

from __future__ import annotations

import contextlib
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from finegrain.engine.distributed import all_reduce_sum
from finegrain.errors import DataError


def autocast(device: torch.device, amp: str):
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Move a batch; image batches optionally in channels-last layout (faster CPU convolutions)."""
    if channels_last and x.dim() == 4:
        return x.to(device, memory_format=torch.channels_last)
    return x.to(device)


@torch.inference_mode()
def evaluate(
    module: nn.Module,
    loader,
    num_classes: int,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "evaluate",
) -> dict:
    """Run ``module`` over ``loader`` ((input, label) batches); exact metrics even when sharded over ranks."""
    module.eval()
    confmat = torch.zeros(num_classes, num_classes, dtype=torch.long)
    top5 = torch.zeros((), dtype=torch.long)
    loss_sum = torch.zeros((), dtype=torch.float64)
    k = min(5, num_classes)
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = to_device(x, device, channels_last)
        with autocast(device, amp):
            logits = module(x).float().cpu()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        confmat += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes**2).view(
            num_classes, num_classes
        )
        top5 += (logits.topk(k, dim=1).indices == y[:, None]).any(1).sum()
    for t in (confmat, top5, loss_sum):
        all_reduce_sum(t)
    return metrics_from_confusion(confmat.numpy(), int(top5), float(loss_sum))


def metrics_from_confusion(confmat: np.ndarray, top5_correct: int, loss_sum: float = 0.0) -> dict:
    """``confmat[true, predicted]``; classes absent from the split are left out of the per-class mean."""
    n = int(confmat.sum())
    support = confmat.sum(1)
    per_class = np.divide(np.diag(confmat), support, out=np.zeros(len(support)), where=support > 0)
    return {
        "n": n,
        "top1": float(np.trace(confmat) / max(n, 1)),
        "top5": top5_correct / max(n, 1),
        "mean_class_acc": float(per_class[support > 0].mean()) if (support > 0).any() else 0.0,
        "loss": loss_sum / max(n, 1),
        "per_class_acc": per_class.tolist(),
        "confusion_matrix": confmat,
    }


def evaluate_checkpoint(
    ckpt_path: str | Path,
    data: str | None = None,
    split: str = "test",
    batch_size: int = 64,
    workers: int = 2,
    amp: str = "none",
    device: str = "auto",
    skip_bad: bool = False,
    out_dir: str | Path | None = None,
) -> dict:
    """Evaluate a checkpoint on a split of its dataset (the split saved by training when there is one);
    writes ``eval_<split>.json`` and ``confusion_<split>.csv`` next to the checkpoint (or in ``out_dir``)."""
    from finegrain.data import ImageDataset, find_bad_images
    from finegrain.data.transforms import eval_transform
    from finegrain.engine.checkpoint import build_model, checkpoint_dataset, load_checkpoint
    from finegrain.engine.distributed import resolve_device

    ckpt = load_checkpoint(ckpt_path)
    run_dir = Path(ckpt["path"]).parent
    index = checkpoint_dataset(ckpt, data)
    data = data or ckpt["config"]["data"]
    samples = index.split(split)
    if not samples:
        raise DataError(f"split '{split}' of '{data}' is empty (splits: train, val, test)")
    skipped = 0
    if skip_bad:
        bad = {s.path for s, _ in find_bad_images(samples)}
        samples, skipped = [s for s in samples if s.path not in bad], len(bad)
    dev = resolve_device(device)
    model = build_model(ckpt).to(dev, memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(
        ImageDataset(samples, eval_transform(model.preprocess)), batch_size=batch_size, num_workers=workers
    )
    start = time.perf_counter()
    metrics = evaluate(
        model, loader, len(index.classes), dev, amp=amp, channels_last=True, progress=True, desc=f"evaluate {split}"
    )
    metrics.update({"split": split, "seconds": time.perf_counter() - start, "skipped_bad": skipped})
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    confmat = metrics.pop("confusion_matrix")
    with (out / f"confusion_{split}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *index.classes])
        writer.writerows([name, *row] for name, row in zip(index.classes, confmat.tolist(), strict=True))
    report = {**metrics, "checkpoint": ckpt["path"], "data": str(data)}
    report["per_class_acc"] = dict(zip(index.classes, metrics["per_class_acc"], strict=True))
    (out / f"eval_{split}.json").write_text(json.dumps(report, indent=2))
    return report
