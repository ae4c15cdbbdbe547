"""BatchNorm folded into the convolution before it, for forward passes of a frozen network in fp32 (the feature cache
and the map cache of partial fine-tuning).

Why: in eval mode a BatchNorm is a per-channel scale and shift, which the convolution before it can apply itself
(``torch.nn.utils.fuse_conv_bn_eval``), so the pass skips a read and a write of every map. On an AVX2-only CPU without
native bf16, where those passes run in fp32, PyTorch spent 31% of a lite0 forward in BatchNorm: lite0 at 224 px,
batch 32, channels-last, AMD EPYC Zen 3 (family 25 model 1), 2 cores, 2026-12-06 (``benchmarks/frozen_pass.py``, two
runs): 29.5 and 27.6 img/s as trained, 41.4 and 44.4 folded
(the default's cub100 head stage there spent 4 of its 5.7 minutes caching features). bf16 passes are left as they are:
folded weights round differently there, and on a CPU with native bf16 the pass was not the bottleneck.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d
from torch.nn.utils import fuse_conv_bn_eval

#: the largest difference a folded copy may make to the output it is checked on (fp32 rounding is ~1e-6 of it)
TOLERANCE = 1e-4


def folded(model: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor], example: torch.Tensor,
           ) -> nn.Module:  # fmt: skip
    """A copy of ``model`` in eval mode with each BatchNorm that follows a convolution (the next of its parent's
    children) folded into it, where ``forward(copy, example)`` gives ``forward(model, example)`` within
    ``TOLERANCE`` (relative to its largest value); else ``model`` itself. The check is what makes the folding safe
    on any model: children listed one after the other need not run one after the other."""
    model.eval()
    copied = copy.deepcopy(model)
    if not _fold(copied):
        return model
    with torch.inference_mode():
        want, got = forward(model, example).float(), forward(copied, example).float()
    scale = float(want.abs().max()) or 1.0
    return copied if float((got - want).abs().max()) <= TOLERANCE * scale else model


def _fold(module: nn.Module) -> int:
    """Fold in place; the number of BatchNorms folded."""
    done = 0
    children = list(module.named_children())
    for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
        # a convolution subclass ('same' padding) keeps its forward: the fused copy only has new weights and bias
        if (isinstance(conv, nn.Conv2d) and type(bn) in (nn.BatchNorm2d, BatchNormAct2d)
                and bn.running_mean is not None and conv.out_channels == bn.num_features):  # fmt: skip
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(module, bn_name, nn.Sequential(bn.drop, bn.act) if type(bn) is BatchNormAct2d else nn.Identity())
            done += 1
    return done + sum(_fold(child) for child in module.children())
