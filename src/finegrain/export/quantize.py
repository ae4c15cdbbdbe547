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

from finegrain.checkpoint import Checkpoint
from finegrain.data import Sample
from finegrain.data.calibration import calibration_loader, evenly_spaced, held_out
from finegrain.data.transforms import Preprocess
from finegrain.env import cpu_model, resolve_int8_target
from finegrain.errors import ExportError
from finegrain.export.onnx import OnnxRunner, export_onnx, read_onnx_metadata, save_with_metadata


class _ImageReader:
    """onnxruntime CalibrationDataReader over image files, batch by batch."""

    def __init__(self, samples: Sequence[Sample], pre: Preprocess) -> None:
        self._batches: Iterator = iter(calibration_loader(samples, pre))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"image": batch[0].numpy()}


#: the least top-1 agreement of int8 with fp32 that export accepts (on held-out training images). The default
#: cub100 model's int8 agreed on 100% of 256 such images (AMD EPYC Zen 4, 2026-11-28); the saturated int8 file on
#: an AVX2-only EPYC, which lost 4.2 pt top-1, agreed with fp32 on 89% of test photos.
MIN_AGREEMENT = 0.95


def int8_agreement(fp32_path: str | Path, int8_path: str | Path, samples: Sequence[Sample]) -> float:
    """Share of ``samples`` on which the int8 file's top-1 class equals the fp32 file's, in ONNX Runtime."""
    fp32, int8 = OnnxRunner(fp32_path), OnnxRunner(int8_path)
    same = total = 0
    for x, _ in calibration_loader(samples, Preprocess.from_dict(fp32.meta["preprocess"]), batch_size=32):
        same += int((fp32(x).argmax(1) == int8(x).argmax(1)).sum())
        total += len(x)
    return same / max(total, 1)


_CALIBRATIONS = {"minmax": lambda m: m.MinMax, "percentile": lambda m: m.Percentile, "entropy": lambda m: m.Entropy}


def float_nodes(path: str | Path, parts: Sequence[str]) -> list[str]:
    """Names of the graph's nodes that stay float: ``stem`` (the first convolution, which sees the raw image),
    ``head`` (the last Gemm/MatMul, whose outputs are the logits), or any other text: the convolutions and matrix
    products whose node name contains it (e.g. ``blocks.6``, ``conv_dw``)."""
    import onnx

    if not parts:
        return []
    nodes = [n for n in onnx.load(str(path), load_external_data=False).graph.node
             if n.op_type in ("Conv", "Gemm", "MatMul")]  # fmt: skip
    named = {"stem": nodes[:1], "head": nodes[-1:]}
    return [n.name for p in parts for n in named.get(p, [n for n in nodes if p in n.name])]


def quantize_onnx(
    fp32_path: str | Path,
    samples: Sequence[Sample],
    out_path: str | Path | None = None,
    per_channel: bool = True,
    target: str = "auto",
    check: Sequence[Sample] = (),
    min_agreement: float = MIN_AGREEMENT,
    calibration: str = "minmax",
    keep_float: Sequence[str] = (),
    **options,
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
            **{"per_channel": per_channel, "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8,
               "calibrate_method": _CALIBRATIONS[calibration](CalibrationMethod), "reduce_range": target == "portable",
               "nodes_to_exclude": float_nodes(prepared, keep_float), **options},
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


def int8_copy(
    ckpt_path: str | Path,
    fp32_path: str | Path,
    data: str | None = None,
    calib_images: int = 256,
    target: str = "auto",
    min_agreement: float = MIN_AGREEMENT,
    check_images: int = 256,
) -> dict:
    """The int8 copy of a checkpoint's fp32 ONNX file: calibrated on training images of its run, checked on
    ``check_images`` other training images (what ``finegrain export --int8`` and ``finegrain qat`` write)."""
    train = Checkpoint.load(ckpt_path).training_samples(data)
    calib = evenly_spaced(train, calib_images)
    return quantize_onnx(fp32_path, calib, target=target, check=held_out(train, calib, check_images),
                         min_agreement=min_agreement)  # fmt: skip


def export_checkpoint(checkpoint: str | Path, out: str | Path | None = None, opset: int = 17, int8: bool = False,
                     data: str | None = None, calib_images: int = 256, int8_target: str = "auto",
                     min_agreement: float | None = None) -> tuple[dict, dict | None]:  # fmt: skip
    """The fp32 ONNX file (checked against PyTorch) and, with ``int8``, its checked int8 copy."""
    fp32 = export_onnx(checkpoint, out, opset=opset)
    if not int8:
        return fp32, None
    kw = {} if min_agreement is None else {"min_agreement": min_agreement}
    return fp32, int8_copy(checkpoint, fp32["path"], data, calib_images, int8_target, **kw)
