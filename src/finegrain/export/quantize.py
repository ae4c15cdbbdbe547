"""Post-training int8 quantization with ONNX Runtime: static, QDQ format, per-channel weights.

Calibration images go through the same ``eval_transform`` as evaluation and prediction, so the int8 model
sees activations in the range it will meet in use.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from finegrain.data import ImageDataset, Sample
from finegrain.data.transforms import Preprocess, eval_transform
from finegrain.export.onnx import read_onnx_metadata, save_with_metadata


class _ImageReader:
    """onnxruntime CalibrationDataReader over image files, batch by batch."""

    def __init__(self, samples: Sequence[Sample], pre: Preprocess) -> None:
        self._batches: Iterator = iter(calibration_loader(samples, pre))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"image": batch[0].numpy()}


def calibration_loader(samples: Sequence[Sample], pre: Preprocess, batch_size: int = 16):
    """(images, labels) batches of ``samples`` through the evaluation preprocessing."""
    return torch.utils.data.DataLoader(ImageDataset(samples, eval_transform(pre)), batch_size=batch_size)


def calibration_samples(ckpt_path: str | Path, data: str | None = None, count: int = 256) -> list[Sample]:
    """``count`` training images of the checkpoint's dataset, evenly spread over the (class-sorted) split."""
    from finegrain.engine.checkpoint import checkpoint_dataset, load_checkpoint
    from finegrain.errors import DataError

    train = checkpoint_dataset(load_checkpoint(ckpt_path), data).split("train")  # never the run's test images
    if not train:
        raise DataError("the checkpoint's dataset has no training images for int8 calibration")
    return evenly_spaced(train, count)


def evenly_spaced(samples: Sequence[Sample], count: int) -> list[Sample]:
    """``count`` samples spread evenly over the (class-sorted) list: every class is represented."""
    step = max(1, len(samples) // count)
    return list(samples[::step][:count])


def quantize_onnx(
    fp32_path: str | Path, samples: Sequence[Sample], out_path: str | Path | None = None, per_channel: bool = True
) -> dict:
    """Write an int8 QDQ copy of an exported fp32 model, calibrated on ``samples`` (a few hundred suffice)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    fp32_path = Path(fp32_path)
    out = Path(out_path) if out_path else fp32_path.with_name(fp32_path.stem + ".int8.onnx")
    meta = read_onnx_metadata(fp32_path)
    pre = Preprocess.from_dict(meta["preprocess"])
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference + graph clean-up for quantization
        quantize_static(
            str(prepared), str(Path(tmp) / "int8.onnx"), _ImageReader(samples, pre), quant_format=QuantFormat.QDQ,
            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
        proto = onnx.load(str(Path(tmp) / "int8.onnx"))
    save_with_metadata(proto, {**meta, "quantization": "int8 static QDQ per-channel"}, out)
    return {"path": str(out), "megabytes": out.stat().st_size / 2**20, "calibration_images": len(samples)}
