"""ONNX export that carries its own class names and preprocessing, and an ONNX Runtime runner.

The exported file alone is enough to predict: ``metadata_props`` hold ``finegrain`` JSON (classes,
preprocessing, method, model options, finegrain version), and :class:`finegrain.predict.Predictor` applies
the same preprocessing code to it as to a checkpoint.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same_arg

from finegrain import __version__
from finegrain.atomic import TEMP_SUFFIX, atomic_path, disk_full
from finegrain.checkpoint import Checkpoint
from finegrain.env import cpu_model, has_vnni
from finegrain.errors import CheckpointError, ConfigError
from finegrain.extras import need
from finegrain.run_layout import RunDir

DEFAULT_OPSET = 17  # well covered by onnxruntime's CPU kernels
METADATA_KEY = "finegrain"


class _PaddedConv(torch.autograd.Function):
    """Zero-pad then convolve, exported as ONE ONNX ``Conv`` with asymmetric ``pads``.

    PyTorch's convolution takes only symmetric padding, so a TF 'same' convolution is a ``Pad`` then a ``Conv``
    in the graph; after int8 quantization each such ``Pad`` also needs a dequantize/quantize pair around it.
    Measured on lite0 int8 (ONNX Runtime, 2 cores, batch 32): the 5 Pads and their Q/DQ took ~49% of the
    time. ONNX's ``Conv`` pads each side separately, so the pad belongs in it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pad: tuple[int, int, int, int], stride, dilation, groups: int):
        return F.conv2d(F.pad(x, pad), weight, bias, stride, 0, dilation, groups)

    @staticmethod
    def symbolic(g, x, weight, bias, pad, stride, dilation, groups):
        left, right, top, bottom = pad
        inputs = [x, weight] if bias is None else [x, weight, bias]
        return g.op(
            "Conv", *inputs, kernel_shape_i=list(weight.type().sizes()[2:]), pads_i=[top, left, bottom, right],
            strides_i=list(stride), dilations_i=list(dilation), group_i=groups,
        )  # fmt: skip


class _StaticSameConv2d(Conv2dSame):
    """TF-style 'same' convolution with its padding fixed for one input size."""

    static_pad: tuple[int, int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PaddedConv.apply(x, self.weight, self.bias, self.static_pad, self.stride, self.dilation, self.groups)


def static_same_padding(model: nn.Module, input_size: int) -> nn.Module:
    """Fix the padding of timm's dynamic 'same' convolutions (tf_ EfficientNets) for ``input_size``, in place.

    Exported as is, they compute their pad amounts from the input's shape in float arithmetic inside the graph,
    and int8 quantization rounds those numbers too: measured on lite0, pads came out wrong, the stem's output
    kept -1 dB SQNR, and the int8 model lost its accuracy on small inputs. Exported models take one input size
    anyway (only the batch is dynamic), so the pads are constants.
    """
    sizes: dict[nn.Module, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: sizes.__setitem__(mod, tuple(args[0].shape[-2:])))
        for m in model.modules()
        if isinstance(m, Conv2dSame)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
    for m, hw in sizes.items():
        m.__class__ = _StaticSameConv2d
        m.static_pad = tuple(pad_same_arg(hw, m.weight.shape[-2:], m.stride, m.dilation))
    return model


def export_onnx(ckpt_path: str | Path, out_path: str | Path | None = None, opset: int = DEFAULT_OPSET) -> dict:
    """Export a checkpoint to ONNX (dynamic batch), check it against PyTorch, return a summary."""
    need("export", "ONNX export")
    import onnx
    import onnxruntime as ort

    ckpt = Checkpoint.load(ckpt_path)
    model = ckpt.build_model()
    if model.export_blocker:
        raise ConfigError(f"cannot export method '{ckpt.method}' as configured: {model.export_blocker}")
    out = Path(out_path) if out_path else ckpt.path.with_suffix(".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    size = ckpt.preprocess.input_size
    static_same_padding(model, size)
    x = torch.randn(2, 3, size, size)
    raw = out.with_name(f".{out.name}.raw{TEMP_SUFFIX}")  # the exporter's output, before the metadata goes in
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            # The TorchScript-based exporter needs no extra packages and handles every registered method.
            torch.onnx.export(
                model, (x,), str(raw), dynamo=False, opset_version=opset, input_names=["image"],
                output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            )  # fmt: skip
        proto = onnx.load(str(raw))
    except (OSError, RuntimeError) as e:
        full = disk_full(e, out)
        if full is not None:
            raise full from e
        raise
    finally:
        raw.unlink(missing_ok=True)  # a partial one too (it stayed behind on a full disk)
    meta = {
        "classes": ckpt.classes,
        "preprocess": ckpt.preprocess.to_dict(),
        "method": ckpt.method,
        "model_kwargs": ckpt.model_kwargs,
        "finegrain_version": __version__,
        "source": str(ckpt.path),
    }
    card = ckpt.path.with_name(RunDir.SHORT_CARD)
    if card.is_file():
        try:
            meta["model_card"] = json.loads(card.read_text())
        except (OSError, json.JSONDecodeError):
            warnings.warn(f"{card} is unreadable: the ONNX file carries no model card", stacklevel=2)
    save_with_metadata(proto, meta, out)

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = model(x).numpy()
    got = session.run(None, {"image": x.numpy()})[0]
    return {"path": str(out), "max_abs_diff": float(np.abs(got - expected).max()), "opset": opset,
            "megabytes": out.stat().st_size / 2**20}  # fmt: skip


def save_with_metadata(proto, meta: dict, out: Path) -> None:
    """Replace the model's finegrain metadata with ``meta`` and write it atomically (temp file + rename)."""
    import onnx

    for i in reversed(range(len(proto.metadata_props))):
        if proto.metadata_props[i].key == METADATA_KEY:
            del proto.metadata_props[i]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    with atomic_path(out, proto.ByteSize()) as tmp:
        onnx.save(proto, str(tmp))


def refresh_model_card(path: Path, card: dict) -> None:
    """Put ``card`` into an existing ONNX file's metadata: an export made before evaluation (``evaluate`` exports
    to time ONNX Runtime) carried no card, so a server of that file showed a generic description."""
    import onnx

    meta = read_onnx_metadata(path)
    save_with_metadata(onnx.load(str(path)), {**meta, "model_card": card}, path)


REQUIRED_METADATA = {"classes": list, "preprocess": dict, "method": str}


def read_onnx_metadata(path: str | Path) -> dict:
    """The finegrain metadata of an ONNX file, checked: every problem is a :class:`CheckpointError` naming it."""
    need("export", "reading an ONNX file")
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX file '{path}' does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf decode errors have no common base
        raise CheckpointError(f"cannot read ONNX file '{path}': {e}") from e
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise CheckpointError(f"'{path}' has no finegrain metadata: export it with `finegrain export`")
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"'{path}': its finegrain metadata is not JSON ({e.msg}); re-export the model") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"'{path}': its finegrain metadata must be a JSON object; re-export the model")
    for key, kind in REQUIRED_METADATA.items():
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(
                f"'{path}': finegrain metadata lacks '{key}' (a JSON {kind.__name__}); re-export the model "
                "with `finegrain export`"
            )
    if not meta["classes"] or not all(isinstance(c, str) for c in meta["classes"]):
        raise CheckpointError(f"'{path}': finegrain metadata 'classes' must be a non-empty list of names")
    meta.setdefault("model_kwargs", {})
    return meta


class OnnxRunner:
    """Logits from an ONNX file with ONNX Runtime; a callable like a model on an image batch tensor.

    The graph is checked against its metadata when it loads, so a mismatched file is refused at once instead of
    predicting over the wrong classes or failing on every request: one image input (N, 3, H, W) with H and W the
    metadata's input size, and one output with one logit per class.
    """

    GRAPH_OPT = ("disable", "basic", "extended", "all")

    def __init__(
        self, path: str | Path, threads: int | None = None, spinning: bool = True, graph_opt: str = "all"
    ) -> None:
        """``spinning=False`` stops idle worker threads from busy-waiting for the next run: slower for
        back-to-back batches, but it leaves the CPU to the rest of a server (decoding, HTTP). ``graph_opt``:
        ONNX Runtime's graph optimisation level (``all`` fuses most; lower levels load faster)."""
        need("export", "running an ONNX file")
        import onnxruntime as ort

        if graph_opt not in self.GRAPH_OPT:
            raise ConfigError(f"graph optimisation level must be one of {', '.join(self.GRAPH_OPT)}, got '{graph_opt}'")
        self.meta = read_onnx_metadata(path)
        level = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                 "all": "ORT_ENABLE_ALL"}[graph_opt]  # fmt: skip
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        if threads:
            opts.intra_op_num_threads = threads
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            raise CheckpointError(f"ONNX Runtime cannot load '{path}': {str(e).splitlines()[0]}") from e
        self.input_name = self._check_graph(Path(path))
        _warn_if_int8_needs_vnni(self.meta, Path(path))

    def _check_graph(self, path: Path) -> str:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        size = self.meta["preprocess"].get("input_size")
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] != 3:
            got = ", ".join(f"{i.name} {i.shape}" for i in inputs)
            raise CheckpointError(f"'{path}' must take one image batch (N, 3, H, W); its inputs are: {got}")
        if any(isinstance(d, int) and d != size for d in inputs[0].shape[2:]):
            raise CheckpointError(
                f"'{path}': the graph takes {inputs[0].shape[2:]} pixels but its metadata says {size}; re-export it"
            )
        n = len(self.meta["classes"])
        if len(outputs) < 1 or not isinstance(outputs[0].shape[-1], int) or outputs[0].shape[-1] != n:
            shape = outputs[0].shape if outputs else "nothing"
            raise CheckpointError(
                f"'{path}': the graph outputs {shape} but its metadata names {n} classes; the file was edited or "
                "assembled from two models. Re-export it with `finegrain export`."
            )
        return inputs[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.contiguous().numpy()})[0])


def _warn_if_int8_needs_vnni(meta: dict, path: Path) -> None:
    """An int8 file made for VNNI CPUs (every int8 file before targets existed was) on a CPU without VNNI."""
    if "quantization" not in meta or has_vnni():
        return
    if meta.get("int8_target", "vnni") == "vnni":
        warnings.warn(
            f"'{path}' was quantized for CPUs with VNNI and this CPU ({cpu_model()}) has none: ONNX Runtime's int8 "
            "sums can saturate here (measured -4.2 pt top-1 on an AVX2-only AMD EPYC). Re-export it on this "
            "machine, or anywhere with `finegrain export --int8 --int8-target portable`.",
            stacklevel=3,
        )
