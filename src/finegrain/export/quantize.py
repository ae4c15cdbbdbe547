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
from scipy.special import log_softmax

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
    return _Divergence(Path(fp32_path), samples)(Path(int8_path))[1]


_CALIBRATIONS = {"minmax": lambda m: m.MinMax, "percentile": lambda m: m.Percentile, "entropy": lambda m: m.Entropy}


def _conv_nodes(path: str | Path) -> list:
    import onnx

    return [n for n in onnx.load(str(path), load_external_data=False).graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul")]  # fmt: skip


def float_nodes(path: str | Path, parts: Sequence[str]) -> list[str]:
    """Names of the graph's nodes that stay float: ``stem`` (the first convolution, which sees the raw image),
    ``head`` (the last Gemm/MatMul, whose outputs are the logits), or any other text: the convolutions and matrix
    products whose node name contains it (e.g. ``blocks.6``, ``conv_dw``)."""
    if not parts:
        return []
    nodes = _conv_nodes(path)
    named = {"stem": nodes[:1], "head": nodes[-1:]}
    return [n.name for p in parts for n in named.get(p, [n for n in nodes if p in n.name])]


def stages(path: str | Path) -> dict[str, list[str]]:
    """The graph's convolutions and matrix products by stage, in graph order: a node's stage is the first part of
    its name that holds a number (``blocks.1`` of ``/backbone/blocks/blocks.1/blocks.1.0/conv_pw/Conv``,
    ``layer3`` of a ResNet), else its module (``conv_stem``, ``conv_head``, the classifier)."""
    groups: dict[str, list[str]] = {}
    for node in _conv_nodes(path):
        parts = [p for p in node.name.split("/") if p] or [node.name]
        stage = next((p for p in parts[:-1] if any(c.isdigit() for c in p)), parts[-2] if len(parts) > 1 else parts[0])
        groups.setdefault(stage, []).append(node.name)
    return groups


#: a stage stays float only where that cuts int8's divergence from fp32 (mean KL of the class probabilities on the
#: check images) by at least this share: below it the choice is noise on a few hundred images, and float costs speed.
FLOAT_GAIN = 0.2
#: at most this many stages stay float. Measured on cub100's default model (Intel Xeon with AMX, 2026-12-02,
#: validation KL and test top-1 of 2,999 photos against fp32's 90.13): all int8 KL 0.0256, -0.53 pt, 384 img/s;
#: blocks.0 float 0.0176, -0.53, 263 img/s; blocks.1 0.0188, -0.27, 218; blocks.0 + blocks.1.0 0.0113, -0.23, 252
#: (test agreement with fp32 95.7 -> 97.0%). Each float stage costs speed; a third was not worth measuring.
MAX_FLOAT_STAGES = 2


#: the later rounds of the search try only this many new stages: the runners-up of the first round, those that alone
#: brought int8 nearest fp32 (and nearer than all-int8). Why: each candidate costs a quantization (~1.6 s for lite0
#: in ONNX Runtime's Python, AMD EPYC Zen 4, 2 cores) and a pass over the check images, and float stages' gains add
#: up nearly independently: on cub100's default model (Intel Xeon, 2026-12-02; int8_xeon_amx.json) the second
#: round's best two pairs, blocks.0 with blocks.1 and with blocks.4, added the first round's two runners-up. A lite0
#: search: 20 -> 14 quantizations.
ROUND_WIDTH = 3


def _float_search(groups: dict[str, list[str]], quantized, divergence) -> tuple[list[str], dict, Path]:
    """Greedy forward selection of the stages left float: the first round tries every stage alone, a later round
    each of the first round's :data:`ROUND_WIDTH` runners-up beside the stages kept; a round keeps its candidate
    nearest fp32 if that cuts the divergence by FLOAT_GAIN. Quantization reuses one calibration, so a
    candidate costs one quantization and one pass over the check images."""
    kept: list[str] = []
    kl, agreement = divergence(file := quantized([], "none.onnx"))
    tried = {"none": {"kl": kl, "agreement": agreement}}
    pool = list(groups)
    for _ in range(MAX_FLOAT_STAGES):
        round_ = {}
        for stage in (g for g in pool if g not in kept):
            name = "+".join([*kept, stage])
            path = quantized([n for g in (*kept, stage) for n in groups[g]], f"{len(tried)}.onnx")
            kl_s, agreement_s = divergence(path)
            tried[name] = {"kl": kl_s, "agreement": agreement_s}
            round_[stage] = (kl_s, path)
        if not kept:  # after the first round: the stages that alone came nearest fp32
            pool = sorted((g for g in round_ if round_[g][0] < kl), key=lambda g: round_[g][0])[: ROUND_WIDTH + 1]
        best = min(round_, key=lambda st: round_[st][0], default=None)
        if best is None or round_[best][0] > (1 - FLOAT_GAIN) * tried["+".join(kept) or "none"]["kl"]:
            break
        kept.append(best)
        file = round_[best][1]
    return kept, tried, file


class _Divergence:
    """How far an int8 file's answers are from the fp32 file's on fixed images: mean KL(fp32 || int8) of the class
    probabilities (continuous, so it ranks files that a few hundred images' top-1 agreement cannot) and the top-1
    agreement."""

    def __init__(self, fp32_path: Path, samples: Sequence[Sample]) -> None:
        fp32 = OnnxRunner(fp32_path)
        pre = Preprocess.from_dict(fp32.meta["preprocess"])
        self.batches = [x for x, _ in calibration_loader(samples, pre, batch_size=32)]
        self.log_p = [log_softmax(np.asarray(fp32(x), dtype=np.float64), axis=1) for x in self.batches]

    def __call__(self, int8_path: Path) -> tuple[float, float]:
        int8 = OnnxRunner(int8_path)
        kl = same = total = 0.0
        for x, log_p in zip(self.batches, self.log_p, strict=True):
            log_q = log_softmax(np.asarray(int8(x), dtype=np.float64), axis=1)
            kl += float((np.exp(log_p) * (log_p - log_q)).sum())
            same += float((log_p.argmax(1) == log_q.argmax(1)).sum())
            total += len(x)
        return kl / max(total, 1), same / max(total, 1)


def quantize_onnx(
    fp32_path: str | Path,
    samples: Sequence[Sample],
    out_path: str | Path | None = None,
    per_channel: bool = True,
    target: str = "auto",
    check: Sequence[Sample] = (),
    min_agreement: float = MIN_AGREEMENT,
    calibration: str = "minmax",
    keep_float: Sequence[str] | str = (),
    choose_on: Sequence[Sample] = (),
    **options,
) -> dict:
    """Write an int8 QDQ copy of an exported fp32 model, calibrated on ``samples`` (a few hundred suffice).

    ``target`` (see :func:`finegrain.env.resolve_int8_target`): ``vnni`` uses full-range int8 weights,
    ``portable`` 7-bit ones that cannot saturate ONNX Runtime's int16 sums on CPUs without VNNI. With ``check``
    images, int8's top-1 agreement with fp32 is measured on them, and a file below ``min_agreement`` is refused.
    ``keep_float``: parts left in float (see :func:`float_nodes`), or ``"auto"``: up to :data:`MAX_FLOAT_STAGES`
    stages (:func:`stages`) chosen on the ``choose_on`` images (default: ``check``) by :func:`_float_search`
    (why: all-int8 portable files were 0.53-0.63 pt behind fp32 on cub100's test split on three CPUs;
    docs/export.md).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    target = resolve_int8_target(target)
    fp32_path = Path(fp32_path)
    out = Path(out_path) if out_path else fp32_path.with_name(fp32_path.stem + ".int8.onnx")
    meta = read_onnx_metadata(fp32_path)
    pre = Preprocess.from_dict(meta["preprocess"])
    search = keep_float == "auto"
    choose_on = choose_on or check
    if search and not choose_on:
        raise ExportError("keep_float='auto' chooses on images: pass check=... or name the parts to keep float")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference + graph clean-up for quantization
        cache = Path(tmp) / "ranges.json"  # calibrated once (every tensor), reused by each candidate of a search

        def quantized(float_names: Sequence[str], name: str) -> Path:
            path = Path(tmp) / name
            quantize_static(
                str(prepared), str(path), None if cache.is_file() else _ImageReader(samples, pre),
                quant_format=QuantFormat.QDQ, calibration_cache_path=cache,
                **{"per_channel": per_channel, "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8,
                   "calibrate_method": _CALIBRATIONS[calibration](CalibrationMethod),
                   "reduce_range": target == "portable", "nodes_to_exclude": list(float_names), **options},
            )  # fmt: skip
            return path

        if search:
            kept, tried, int8_file = _float_search(stages(prepared), quantized, _Divergence(fp32_path, choose_on))
        else:
            kept, tried, int8_file = list(keep_float), {}, quantized(float_nodes(prepared, keep_float), "int8.onnx")
        proto = onnx.load(str(int8_file))
        candidate = Path(tmp) / out.name
        quant = {"quantization": f"int8 static QDQ per-channel ({target})", "int8_target": target,
                 "float_stages": ",".join(kept)}  # fmt: skip
        save_with_metadata(proto, {**meta, **quant}, candidate)
        result = {"int8_target": target, "calibration_images": len(samples), "cpu_model": cpu_model(),
                  "float_stages": kept, **({"float_search": tried} if search else {})}  # fmt: skip
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
    out: str | Path | None = None,
) -> dict:
    """The int8 copy of a checkpoint's fp32 ONNX file: calibrated on training images of its run, checked on
    ``check_images`` other training images; the stages left float are chosen on its validation images where it has
    some (what ``finegrain export --int8`` and ``finegrain qat`` write). Validation, not training images, choose,
    because the head fits its training images: on cub100 every float-stage choice agreed with fp32 on 100% of 256
    held-out training images, while validation images told them apart (KL 0.011-0.033)."""
    ckpt = Checkpoint.load(ckpt_path)
    train = ckpt.training_samples(data)
    calib = evenly_spaced(train, calib_images)
    return quantize_onnx(fp32_path, calib, out, target=target, check=held_out(train, calib, check_images),
                         min_agreement=min_agreement, keep_float="auto",
                         choose_on=evenly_spaced(ckpt.dataset(data).split("val"), check_images))  # fmt: skip


def export_checkpoint(checkpoint: str | Path, out: str | Path | None = None, opset: int = 17, int8: bool = False,
                     data: str | None = None, calib_images: int = 256, int8_target: str = "auto",
                     min_agreement: float | None = None) -> tuple[dict, dict | None]:  # fmt: skip
    """The fp32 ONNX file (checked against PyTorch) and, with ``int8``, its checked int8 copy."""
    fp32 = export_onnx(checkpoint, out, opset=opset)
    if not int8:
        return fp32, None
    kw = {} if min_agreement is None else {"min_agreement": min_agreement}
    return fp32, int8_copy(checkpoint, fp32["path"], data, calib_images, int8_target, **kw)
