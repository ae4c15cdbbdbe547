"""Evaluation: top-1, top-5 and mean per-class accuracy from a confusion matrix that sums across ranks."""

from __future__ import annotations

import contextlib
import csv
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from finegrain.engine.distributed import all_reduce_sum
from finegrain.env import machine_info, precision_name, resolve_amp
from finegrain.errors import DataError


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

    ``keep_predictions`` adds this process's per-sample predicted class and its probability, in loader order.
    """
    if isinstance(module, nn.Module):
        module.eval()
    predicted, confidence = [], []
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
        if keep_predictions:
            prob, pred = logits.softmax(1).max(1)
            predicted.append(pred)
            confidence.append(prob)
    for t in (confmat, top5, loss_sum):
        all_reduce_sum(t)
    metrics = metrics_from_confusion(confmat.numpy(), int(top5), float(loss_sum))
    if keep_predictions:
        metrics["predicted"] = torch.cat(predicted).tolist() if predicted else []
        metrics["confidence"] = torch.cat(confidence).tolist() if confidence else []
    return metrics


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
    amp: str = "auto",
    device: str = "auto",
    skip_bad: bool = False,
    out_dir: str | Path | None = None,
    report: bool = False,
    runner=None,
) -> dict:
    """Evaluate a checkpoint on a split of its dataset (the split saved by training when there is one);
    writes ``eval_<split>.json`` and ``confusion_<split>.csv`` next to the checkpoint (or in ``out_dir``),
    and with ``report`` also ``predictions_<split>.csv`` and the HTML report ``report_<split>.html``.

    ``runner``: a callable that computes the same logits faster (e.g. the checkpoint's ONNX export in ONNX
    Runtime, chosen one layer up); the checkpoint's PyTorch model is still what reports and part metrics use."""
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
        runner or model, loader, len(index.classes), dev, amp="none" if runner else amp, channels_last=runner is None,
        progress=True, desc=f"evaluate {split}", keep_predictions=report,
    )  # fmt: skip
    metrics.update({"split": split, "seconds": time.perf_counter() - start, "skipped_bad": skipped})
    if getattr(model, "part_groups", None) and index.part_names:
        metrics["part_localisation"] = evaluate_part_localisation(model, samples, index.part_names, dev, workers)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    confmat = metrics.pop("confusion_matrix")
    with (out / f"confusion_{split}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *index.classes])
        writer.writerows([name, *row] for name, row in zip(index.classes, confmat.tolist(), strict=True))
    predicted, confidence = metrics.pop("predicted", None), metrics.pop("confidence", None)
    result = {**metrics, "checkpoint": ckpt["path"], "data": str(data)}
    result["engine"] = "onnxruntime" if runner else "torch"
    result["amp_used"] = precision_name("none" if runner else amp, dev)
    result["machine"] = machine_info()
    result["per_class_acc"] = dict(zip(index.classes, metrics["per_class_acc"], strict=True))
    (out / f"eval_{split}.json").write_text(json.dumps(result, indent=2))
    if report:
        from finegrain.report import write_report

        with (out / f"predictions_{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "true", "predicted", "probability"])
            writer.writerows(
                [s.path, index.classes[s.label], index.classes[p], f"{c:.6f}"]
                for s, p, c in zip(samples, predicted, confidence, strict=True)
            )
        result["report"] = str(write_report(
            out / f"report_{split}.html", model, index, samples, predicted, confidence, confmat, result
        ))  # fmt: skip
    return result


@torch.inference_mode()
def evaluate_part_localisation(model: nn.Module, samples, part_names, device, workers: int = 2) -> dict:
    """How well a ``parts`` model finds its parts on held-out images: per part group, the mean IoU of the
    located box with the box derived from the annotated keypoints (where the part is visible), and the share
    of those images with IoU >= 0.5."""
    from finegrain.data import ImageDataset
    from finegrain.data.transforms import eval_transform
    from finegrain.models.regions import box_iou

    ds = ImageDataset(samples, eval_transform(model.preprocess), model.part_groups, part_names, model.part_pad)
    ious = [[] for _ in model.part_groups]
    model.eval()
    for x, _, t in torch.utils.data.DataLoader(ds, batch_size=32, num_workers=workers):
        boxes = torch.stack(model.attention_boxes(x.to(device)), 1)
        iou = box_iou(boxes, t["part_boxes"])
        for p in range(len(ious)):
            ious[p] += iou[t["part_visible"][:, p], p].tolist()
    return {
        name: {"mean_iou": float(np.mean(v)) if v else None, "iou_at_0.5": float(np.mean(np.array(v) >= 0.5)) if v
               else None, "n": len(v)}
        for name, v in zip(model.part_groups, ious, strict=True)
    }  # fmt: skip
