"""Method registry in the style of timm: ``@register_model("name")`` and ``create_model("name", ...)``."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from finegrain.errors import ConfigError

_METHODS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        _METHODS[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_METHODS)


def create_model(method: str = "baseline", **kwargs) -> nn.Module:
    """Build a registered method, e.g. ``create_model("baseline", backbone="tf_efficientnet_lite0",
    num_classes=200)``. The keyword arguments are stored in checkpoints to rebuild the same model."""
    if method not in _METHODS:
        raise ConfigError(f"unknown method '{method}': choose one of {', '.join(list_models())}")
    model = _METHODS[method](**kwargs)
    model.method = method
    model.model_kwargs = dict(kwargs)
    return model
