"""Evaluating a checkpoint into files: metrics JSON, confusion matrix (CSV and picture), predictions, the HTML
report, the model card, and the run's experiment trackers.

This is the layer above the engine's metrics (``finegrain.engine.evaluate``) and the runtimes (PyTorch, or ONNX
Runtime chosen by ``finegrain.predict``): it only reads what they compute and writes it down.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from finegrain.atomic import atomic_path, write_text
from finegrain.checkpoint import Checkpoint
from finegrain.data import ImageDataset
from finegrain.data.source import data_source
from finegrain.data.transforms import eval_transform
from finegrain.engine.distributed import resolve_device
from finegrain.engine.evaluate import evaluate
from finegrain.engine.tracking import RunTracker
from finegrain.env import machine_info, precision_name
from finegrain.errors import DataError
from finegrain.escape import csv_cell
from finegrain.extras import has, need
from finegrain.models.regions import box_iou
from finegrain.report.card import read_confusion, write_model_card
from finegrain.report.confidence import unsure_threshold
from finegrain.report.html import confusion_png, write_report
from finegrain.run_layout import RunDir


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
    ckpt = Checkpoint.load(ckpt_path)
    index = ckpt.dataset(data)
    data = data or ckpt.train_config().dataset.data
    if not index.count(split):
        raise DataError(f"split '{split}' of '{data}' is empty (splits: train, val, test)")
    source = data_source(index)
    if report:
        need("plots", "--report (its pictures)")
        source.require_listed("--report shows thumbnails of chosen test images, fetched by name",
                              "evaluate a local shard folder or the dataset itself")  # fmt: skip
    dev = resolve_device(device)
    model = ckpt.build_model().to(dev, memory_format=torch.channels_last)
    dataset, workers, skipped, samples = source.evaluation(split, eval_transform(model.preprocess), skip_bad, workers)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    start = time.perf_counter()
    metrics = evaluate(
        runner or model, loader, len(index.classes), dev, amp="none" if runner else amp, channels_last=runner is None,
        progress=True, desc=f"evaluate {split}", keep_predictions=report,
    )  # fmt: skip
    metrics.update({"split": split, "seconds": time.perf_counter() - start, "skipped_bad": skipped})
    if split == "test" and source.listed and index.count("val"):  # (streams: labels are not kept in order)
        metrics["unsure"] = _unsure_on_validation(runner or model, model.preprocess, source, len(index.classes), dev,
                                                  "none" if runner else amp, batch_size, workers)  # fmt: skip
    if model.part_groups and index.part_names and source.listed:  # (streams: not measured)
        metrics["part_localisation"] = evaluate_part_localisation(model, samples, index.part_names, dev, workers)
    out = Path(out_dir) if out_dir else ckpt.run_dir
    out.mkdir(parents=True, exist_ok=True)
    confmat = metrics.pop("confusion_matrix")
    with atomic_path(RunDir(out).confusion(split)) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *map(csv_cell, index.classes)])
        writer.writerows([csv_cell(name), *row] for name, row in zip(index.classes, confmat.tolist(), strict=True))
    predicted, confidence = metrics.pop("predicted", None), metrics.pop("confidence", None)
    for per_image in ("labels", "true_log_p"):  # (labels: the samples' own, in the same order)
        metrics.pop(per_image, None)
    result = {**metrics, "checkpoint": str(ckpt.path), "data": str(data)}
    result["engine"] = "onnxruntime" if runner else "torch"
    result["amp_used"] = precision_name("none" if runner else amp, dev)
    result["machine"] = machine_info()
    result["per_class_acc"] = dict(zip(index.classes, metrics["per_class_acc"], strict=True))
    write_text(RunDir(out).evaluation(split), json.dumps(result, indent=2))
    if report:
        with atomic_path(RunDir(out).predictions(split)) as tmp, tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "true", "predicted", "probability"])
            writer.writerows(
                [csv_cell(s.key), csv_cell(index.classes[s.label]), csv_cell(index.classes[p]), f"{c:.6f}"]
                for s, p, c in zip(samples, predicted, confidence, strict=True)
            )
        result["report"] = str(write_report(
            RunDir(out).report(split), model, index, samples, predicted, confidence, confmat, result
        ))  # fmt: skip
    return result


def _unsure_on_validation(model, preprocess, source, classes: int, dev, amp: str, batch_size: int,
                          workers: int) -> dict:  # fmt: skip
    """The unsure threshold (``finegrain.report.confidence``) from the validation split's predictions: the test
    split's card reports it, the page and the API flag answers below it."""
    dataset, workers, _, samples = source.evaluation("val", eval_transform(preprocess), False, workers)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    m = evaluate(model, loader, classes, dev, amp=amp, channels_last=isinstance(model, nn.Module),
                 desc="evaluate val (unsure threshold)", keep_predictions=True)  # fmt: skip
    correct = np.array(m["predicted"]) == np.array([s.label for s in samples])
    return unsure_threshold(np.array(m["confidence"]), correct)


@torch.inference_mode()
def evaluate_part_localisation(model: nn.Module, samples, part_names, device, workers: int = 2) -> dict:
    """How well a ``parts`` model finds its parts on held-out images: per part group, the mean IoU of the
    located box with the box derived from the annotated keypoints (where the part is visible), and the share
    of those images with IoU >= 0.5."""
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


def after_evaluation(result: dict, out: Path, split: str) -> Path:
    """The confusion picture and the model card beside the evaluation, and the final numbers and files for the
    trackers the run logs to; returns the card's path."""
    ckpt = Checkpoint.load(result["checkpoint"])
    _, confmat = read_confusion(RunDir(out).confusion(split))
    picture = RunDir(out).confusion(split, picture=True)
    if has("plots"):  # (without the plots extra the matrix is in the CSV only)
        with atomic_path(picture) as tmp:
            tmp.write_bytes(confusion_png(np.asarray(confmat)))
    card = write_model_card(ckpt, result, out)
    cfg = ckpt.train_config()
    if cfg is not None and cfg.run.log:
        run_dir = ckpt.run_dir
        tracker = RunTracker(run_dir, cfg.run.log, cfg.run.tracking_uri)
        curves = [run_dir / RunDir.CURVES] if (run_dir / RunDir.CURVES).is_file() else []
        tracker.final(result, split, [p for p in (picture, *curves, out / RunDir.CARD, ckpt.path) if p.is_file()])
        tracker.close()
    return card
