"""How a pruned model is rebuilt: its layers' channel counts as plain numbers, applied to a freshly built model.

Pruning itself (choosing channels, Torch-Pruning) lives in ``finegrain.compress``; this is the part that loading
a checkpoint needs, so it sits beside the models, low in the house. Checkpoints store ``structure(model)`` and
keep loading with ``weights_only=True``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from finegrain.errors import ConfigError


def structure(model: nn.Module) -> dict[str, dict[str, int]]:
    """Channel counts of every conv, linear and norm layer."""
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            out[name] = {"in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = {"num_features": m.num_features}
    return out


def apply_structure(model: nn.Module, target: dict[str, dict[str, int]]) -> nn.Module:
    """Resize layers of an unpruned model to ``target`` (weights are then loaded with ``load_state_dict``)."""
    modules = dict(model.named_modules())
    for name, attrs in target.items():
        m = modules.get(name)
        if m is None:
            raise ConfigError(f"pruned structure names layer '{name}', which this model does not have")
        for key, value in attrs.items():
            setattr(m, key, value)
        if isinstance(m, nn.Conv2d):
            shape = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
            m.weight = nn.Parameter(torch.empty(shape))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_channels))
        elif isinstance(m, nn.Linear):
            m.weight = nn.Parameter(torch.empty(m.out_features, m.in_features))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_features))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.weight is not None:
                m.weight, m.bias = nn.Parameter(torch.empty(n)), nn.Parameter(torch.empty(n))
            if m.running_mean is not None:
                m.running_mean, m.running_var = torch.zeros(n), torch.ones(n)
    return model
