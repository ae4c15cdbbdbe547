"""Large depthwise convolutions train in fp32 while the rest of a bf16 training step stays in bf16, on a CPU.

Why: oneDNN's bf16 backward of depthwise convolutions with 5x5 kernels is several times slower than its fp32 one,
and EfficientNet-Lite's later stages are mostly such convolutions. Measured on an AMD EPYC Zen 4 (family 25 model
17, AVX-512 with native bf16, 2 cores, batch 32, channels-last, 2026-12-07; /tmp scripts, two rounds each): one
depthwise 5x5 convolution of 1,152 channels at 7x7, forward + backward, 53 ms in bf16 against 15 ms in fp32 (3x3:
3.5 against 3.3 ms; the pointwise convolutions are faster in bf16, 7.4 against 11.1 ms); a training step of lite0's
last two stages on cached 112x14x14 maps 93-98 -> 189-195 images/s with the 5x5 depthwise convolutions in fp32
(157-175 with the 3x3 ones too); a whole-network step at 176 px 34 -> 44-47, at 224 px 20-25 -> 28-33. fp32 is the
more precise of the two, so the outputs change only by bf16's rounding. Only the forward passes of training steps
(and the recipe's speed probe, so that plans see the same speed) are affected: inference keeps its precision.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn as nn

#: depthwise convolutions with a kernel this wide or wider run in fp32 under a CPU's bf16 autocast (see above: 3x3
#: ones gained less, and lost in the maps step)
MIN_KERNEL = 5


def _fp32_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return type(self).forward(self, x.float())  # the class's own forward: timm's 'same' padding included


def large_depthwise(module: nn.Module) -> list[nn.Conv2d]:
    """The depthwise convolutions of ``module`` (one filter per channel) whose kernel is at least MIN_KERNEL."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1
            and max(m.kernel_size) >= MIN_KERNEL]  # fmt: skip


@contextlib.contextmanager
def fp32_depthwise(module: nn.Module, device: torch.device, amp: str) -> Iterator[None]:
    """Within the block, ``module``'s large depthwise convolutions compute in fp32 where ``amp`` (resolved) is bf16
    on a CPU; elsewhere nothing changes. The modules and their weights stay as they are (a forward is patched on
    the instance and removed at the end), so checkpoints and exports do not see it."""
    convs = large_depthwise(module) if device.type == "cpu" and amp == "bf16" else []
    for conv in convs:
        conv.forward = types.MethodType(_fp32_forward, conv)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward
