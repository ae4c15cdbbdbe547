"""Large depthwise convolutions train in fp32 while the rest of a bf16 training step stays in bf16, on a CPU.

Why: oneDNN's bf16 backward of depthwise convolutions with 5x5 kernels is several times slower than its fp32 one,
and EfficientNet-Lite's later stages are mostly such convolutions. On an AMD EPYC Zen 4 (family 25 model 17, AVX-512
with native bf16, 2 cores, 2026-12-07), the recipe's own speed probe, median of 3 alternating rounds
(``python benchmarks/depthwise_precision.py``): lite0's last two stages on cached maps 110 -> 191 images/s, the whole
network at 176 px 40 -> 53, at 224 px 25 -> 32. One-off checks the same day (not kept as benchmarks): one 5x5
depthwise convolution of 1,152 channels at 7x7, batch 32, forward + backward, 53 ms in bf16 against 15 in fp32,
while 3x3 ones were even (3.5 / 3.3 ms) and pointwise ones faster in bf16 (7.4 / 11.1 ms); with the 3x3 ones in fp32
too, the maps step gained less (157-175 images/s). fp32 is the more precise of the two, so the outputs change only
by bf16's rounding. Only the forward passes of training steps (and the recipe's speed probe, so that plans see the
same speed) are affected: inference keeps its precision.
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
