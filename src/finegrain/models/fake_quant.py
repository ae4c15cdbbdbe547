"""Quantization-aware training that simulates exactly the int8 model ONNX Runtime will run (the QDQ route).

The int8 deployment path is: export to ONNX (BatchNorm folded into the convolution before it), then ONNX
Runtime static quantization — weights int8 symmetric per output channel (scale = max|w| / 127, or / 64 for
the portable target), activations
uint8 per tensor from calibration min/max. QAT here fine-tunes the network while the forward pass rounds
*those* numbers: each conv's BN-folded weight is fake-quantized per channel and unfolded again (BN statistics
are frozen, so folding is exact), and each conv/linear input is fake-quantized with ranges calibrated on the
same training images the exporter calibrates on. Rounding uses ``torch.fake_quantize_*`` (straight-through
gradients), not the deprecated eager ``torch.ao.quantization`` API.

Modules are switched to QAT subclasses in place (``__class__``), so parameter names, checkpoints and
``build_model`` are unchanged: the saved model is a normal checkpoint whose weights were trained to survive
rounding, and ``finegrain export --int8`` turns it into the int8 file.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same

#: symmetric int8 weights as ONNX Runtime quantizes them for each int8 target (finegrain.env.resolve_int8_target):
#: full range for VNNI CPUs, ``reduce_range``'s [-64, 64] for portable files
QMAX_WEIGHT = {"vnni": 127, "portable": 64}
QMAX_ACT = 255  # uint8 activations


def _fake_quant_weight(w: torch.Tensor, qmax: int) -> torch.Tensor:
    scale = (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / qmax).clamp(min=1e-12)
    zero = torch.zeros(len(w), dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zero, 0, -qmax, qmax)


class _QATMixin:
    """Fake-quantizes the layer input (once ranges are calibrated) and the (BN-folded) weight."""

    def _qat_init(self, bn: nn.modules.batchnorm._BatchNorm | None, weight_qmax: int) -> None:
        object.__setattr__(self, "_qat_bn", bn)
        self.weight_qmax = weight_qmax  # a plain reference: not a submodule, not in the state dict
        self.register_buffer("act_lo", torch.tensor(float("inf")), persistent=False)
        self.register_buffer("act_hi", torch.tensor(float("-inf")), persistent=False)
        self.observing = False

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.act_lo = torch.minimum(self.act_lo, x.detach().min().float())
            self.act_hi = torch.maximum(self.act_hi, x.detach().max().float())
            return x
        if not torch.isfinite(self.act_lo):
            return x  # never calibrated (e.g. a branch calibration did not reach)
        lo, hi = self.act_lo.clamp(max=0), self.act_hi.clamp(min=0)
        scale = ((hi - lo) / QMAX_ACT).clamp(min=1e-8)
        zero = torch.round(-lo / scale).int()
        return torch.fake_quantize_per_tensor_affine(x, scale.float(), zero, 0, QMAX_ACT)

    def _quant_weight(self) -> torch.Tensor:
        w = self.weight
        bn = self._qat_bn
        if bn is None:
            return _fake_quant_weight(w, self.weight_qmax)
        factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, *([1] * (w.dim() - 1)))
        return _fake_quant_weight(w * factor, self.weight_qmax) / factor


class QATConv2d(_QATMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quant_input(x), self._quant_weight(), self.bias)


class QATConv2dSame(_QATMixin, Conv2dSame):
    """timm's TF-style 'same' padding (the tf_ EfficientNets' stem and stride-2 convs): pad, then convolve."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(
            self._quant_input(x), self._quant_weight(), self.bias, self.stride, 0, self.dilation, self.groups
        )


class QATLinear(_QATMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self._quant_weight(), self.bias)


QAT_CLASSES = {nn.Conv2d: QATConv2d, Conv2dSame: QATConv2dSame, nn.Linear: QATLinear}


def _conv_bn_pairs(model: nn.Module) -> dict[nn.Conv2d, nn.modules.batchnorm._BatchNorm]:
    """Each conv immediately followed (in its parent) by a BatchNorm over its outputs: what export folds."""
    pairs: dict = {}
    for parent in model.modules():
        children = list(parent.children())
        for a, b in zip(children, children[1:], strict=False):
            if (
                isinstance(a, nn.Conv2d)
                and isinstance(b, nn.modules.batchnorm._BatchNorm)
                and b.num_features == a.out_channels
            ):
                pairs[a] = b
    return pairs


def prepare_qat(model: nn.Module, target: str = "vnni") -> nn.Module:
    """Switch every Conv2d / Linear of ``model`` to its QAT form, in place, rounding weights as the int8
    ``target`` (``vnni`` or ``portable``) will. BN statistics must stay frozen."""
    pairs = _conv_bn_pairs(model)
    qmax = QMAX_WEIGHT[target]
    for m in model.modules():
        qat_class = QAT_CLASSES.get(type(m))
        if qat_class is None and isinstance(m, nn.Conv2d | nn.Linear) and not isinstance(m, _QATMixin):
            raise NotImplementedError(f"QAT has no form of {type(m).__name__} yet")
        if qat_class is not None:
            m.__class__ = qat_class
            m._qat_init(pairs.get(m), qmax)
    return model


def qat_layers(model: nn.Module) -> list[_QATMixin]:
    return [m for m in model.modules() if isinstance(m, _QATMixin)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device) -> int:
    """Record each layer's input min/max over ``batches`` (eval mode); returns the number of images seen."""
    layers = qat_layers(model)
    for m in layers:
        m.observing = True
    model.eval()
    seen = 0
    try:
        for x in batches:
            model(x.to(device))
            seen += len(x)
    finally:
        for m in layers:
            m.observing = False
    return seen
