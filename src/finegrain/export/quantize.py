"""Post-training int8 quantization with ONNX Runtime: static, QDQ format, per-channel weights.

Calibration images go through the same ``eval_transform`` as evaluation and prediction, so the int8 model
sees activations in the range it will meet in use.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from finegrain.data import ImageDataset, Sample
from finegrain.data.transforms import Preprocess, eval_transform
from finegrain.env import cpu_model, resolve_int8_target
from finegrain.errors import ExportError
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


def training_samples(ckpt_path: str | Path, data: str | None = None) -> list[Sample]:
    """The training split of the checkpoint's dataset (never the run's validation or test images)."""
    from finegrain.engine.checkpoint import checkpoint_dataset, load_checkpoint
    from finegrain.errors import DataError

    train = checkpoint_dataset(load_checkpoint(ckpt_path), data).split("train")
    if not train:
        raise DataError("the checkpoint's dataset has no training images for int8 calibration")
    return train


def calibration_samples(ckpt_path: str | Path, data: str | None = None, count: int = 256) -> list[Sample]:
    """``count`` training images of the checkpoint's dataset, evenly spread over the (class-sorted) split."""
    return evenly_spaced(training_samples(ckpt_path, data), count)


def evenly_spaced(samples: Sequence[Sample], count: int) -> list[Sample]:
    """``count`` samples spread evenly over the (class-sorted) list: every class is represented."""
    step = max(1, len(samples) // count)
    return list(samples[::step][:count])


def held_out(samples: Sequence[Sample], used: Sequence[Sample], count: int) -> list[Sample]:
    """``count`` of ``samples`` that are not in ``used``, evenly spread: images int8 was not calibrated on."""
    seen = {s.path for s in used}
    return evenly_spaced([s for s in samples if s.path not in seen], count)


#: the least top-1 agreement of int8 with fp32 that export accepts (on held-out training images). The default
#: cub100 model's int8 agreed on 100% of 256 such images (AMD EPYC Zen 4, 2026-11-28); the saturated int8 file on
#: an AVX2-only EPYC, which lost 4.2 pt top-1, agreed with fp32 on 89% of test photos.
MIN_AGREEMENT = 0.95


def int8_agreement(fp32_path: str | Path, int8_path: str | Path, samples: Sequence[Sample]) -> float:
    """Share of ``samples`` on which the int8 file's top-1 class equals the fp32 file's, in ONNX Runtime."""
    from finegrain.export.onnx import OnnxRunner

    fp32, int8 = OnnxRunner(fp32_path), OnnxRunner(int8_path)
    same = total = 0
    for x, _ in calibration_loader(samples, Preprocess.from_dict(fp32.meta["preprocess"]), batch_size=32):
        same += int((fp32(x).argmax(1) == int8(x).argmax(1)).sum())
        total += len(x)
    return same / max(total, 1)


def quantize_onnx(
    fp32_path: str | Path,
    samples: Sequence[Sample],
    out_path: str | Path | None = None,
    per_channel: bool = True,
    target: str = "auto",
    check: Sequence[Sample] = (),
    min_agreement: float = MIN_AGREEMENT,
) -> dict:
    """Write an int8 QDQ copy of an exported fp32 model, calibrated on ``samples`` (a few hundred suffice).

    ``target`` (see :func:`finegrain.env.resolve_int8_target`): ``vnni`` uses full-range int8 weights,
    ``portable`` 7-bit ones that cannot saturate ONNX Runtime's int16 sums on CPUs without VNNI. With ``check``
    images, int8's top-1 agreement with fp32 is measured on them, and a file below ``min_agreement`` is refused.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    target = resolve_int8_target(target)
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
            calibrate_method=CalibrationMethod.MinMax, reduce_range=target == "portable",
        )  # fmt: skip
        proto = onnx.load(str(Path(tmp) / "int8.onnx"))
        candidate = Path(tmp) / out.name
        quant = {"quantization": f"int8 static QDQ per-channel ({target})", "int8_target": target}
        save_with_metadata(proto, {**meta, **quant}, candidate)
        result = {"int8_target": target, "calibration_images": len(samples), "cpu_model": cpu_model()}
        if check:
            agreement = int8_agreement(fp32_path, candidate, check)
            result.update(agreement=agreement, agreement_images=len(check))
            if agreement < min_agreement:
                other = "portable" if target == "vnni" else "vnni (on a CPU with VNNI)"
                raise ExportError(
                    f"int8 agrees with fp32 on only {agreement:.1%} of {len(check)} held-out training images "
                    f"(at least {min_agreement:.0%} required); no int8 file written. Try --int8-target {other}, "
                    "more --calib-images, or quantization-aware training (`finegrain qat`); the fp32 .onnx file "
                    "is unaffected."
                )
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(candidate, out)
    return {"path": str(out), "megabytes": out.stat().st_size / 2**20, **result}
