"""Evaluation: top-1, top-5 and mean per-class accuracy from a confusion matrix that sums across ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from finegrain.checkpoint import Checkpoint
from finegrain.data.source import data_source
from finegrain.data.transforms import eval_transform
from finegrain.engine.distributed import all_reduce_sum, resolve_device
from finegrain.env import resolve_amp
from finegrain.progress import progress_bar
from finegrain.run_layout import RunDir


def autocast(device: torch.device, amp: str):
    """bf16 autocast when ``amp`` resolves to it on ``device`` (``auto``: only where bf16 is native)."""
    if resolve_amp(amp, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Move a batch; image batches optionally in channels-last layout (faster CPU convolutions)."""
    if channels_last and x.dim() == 4:
        return x.to(device, memory_format=torch.channels_last)
    return x.to(device)


@torch.inference_mode()
def evaluate(
    module: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    loader,
    num_classes: int,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "evaluate",
    keep_predictions: bool = False,
) -> dict:
    """Run ``module`` over ``loader`` ((input, label) batches); exact metrics even when sharded over ranks.

    ``keep_predictions`` adds this process's per-sample predicted class, its probability, the true class and the
    log-probability given to it, in loader order.
    """
    if isinstance(module, nn.Module):
        module.eval()
    predicted, confidence, labels, true_log_p = [], [], [], []
    confmat = torch.zeros(num_classes, num_classes, dtype=torch.long)
    top5 = torch.zeros((), dtype=torch.long)
    loss_sum = torch.zeros((), dtype=torch.float64)
    k = min(5, num_classes)
    for x, y in progress_bar(loader, desc=desc, disable=not progress, leave=False):
        x = to_device(x, device, channels_last)
        with autocast(device, amp):
            logits = module(x).float().cpu()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        confmat += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes**2).view(
            num_classes, num_classes
        )
        top5 += (logits.topk(k, dim=1).indices == y[:, None]).any(1).sum()
        if keep_predictions:
            prob, pred = logits.softmax(1).max(1)
            predicted.append(pred)
            confidence.append(prob)
            labels.append(y)
            true_log_p.append(logits.log_softmax(1)[torch.arange(len(y)), y])
    for t in (confmat, top5, loss_sum):
        all_reduce_sum(t)
    metrics = metrics_from_confusion(confmat.numpy(), int(top5), float(loss_sum))
    if keep_predictions:
        metrics["predicted"] = torch.cat(predicted).tolist() if predicted else []
        metrics["confidence"] = torch.cat(confidence).tolist() if confidence else []
        metrics["labels"] = torch.cat(labels).tolist() if labels else []
        metrics["true_log_p"] = torch.cat(true_log_p).tolist() if true_log_p else []
    return metrics


def right(metrics: dict) -> list[bool]:
    """Which images :func:`evaluate` (with ``keep_predictions``) saw answered right, in loader order."""
    return [p == y for p, y in zip(metrics["predicted"], metrics["labels"], strict=True)]


def run_answers(run_dir: str | Path, split: str, workers: int) -> dict:
    """A run's ``best.pt`` on one split of its own data, in split order, as its config runs it (``--skip-bad``: the
    images it could not read left out, as training left them): :func:`evaluate`'s metrics with the per-image answers
    (``predicted``, ``labels``, ``true_log_p`` ...)."""
    ckpt = Checkpoint.load(Path(run_dir) / RunDir.BEST)
    model, index, cfg = ckpt.build_model(), ckpt.dataset(), ckpt.train_config()
    transform = eval_transform(model.preprocess)
    dataset, workers, _, _ = data_source(index).evaluation(split, transform, cfg.dataset.skip_bad, workers)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=workers)
    device = resolve_device(cfg.speed.device)
    return evaluate(model.to(device), loader, len(index.classes), device, amp="auto", keep_predictions=True)


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
