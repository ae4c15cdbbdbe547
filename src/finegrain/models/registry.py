"""Method registry in the style of timm: ``@register_model("name")`` and ``create_model("name", ...)``."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from finegrain.errors import ConfigError

_METHODS: dict[str, Callable[..., nn.Module]] = {}
_NEEDS_CLASS_INFO: set[str] = set()


def register_model(name: str, needs_class_info: bool = False) -> Callable:
    """Register a method's factory; ``needs_class_info``: it is built with class embeddings (``embedding`` and
    ``class_embed`` keyword arguments) made from the dataset's class side-information."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        _METHODS[name] = fn
        if needs_class_info:
            _NEEDS_CLASS_INFO.add(name)
        return fn

    return wrap


def needs_class_info(method: str) -> bool:
    return method in _NEEDS_CLASS_INFO


def list_models() -> list[str]:
    return sorted(_METHODS)


def describe_model(method: str) -> str:
    """The first line of the method's factory docstring (``finegrain models`` prints it)."""
    return ((_METHODS[method].__doc__ or "").strip().splitlines() or [""])[0]


def create_model(method: str = "baseline", **kwargs) -> nn.Module:
    """Build a registered method, e.g. ``create_model("baseline", backbone="tf_efficientnet_lite0",
    num_classes=200)``. The keyword arguments are stored in checkpoints to rebuild the same model."""
    if method not in _METHODS:
        raise ConfigError(f"unknown method '{method}': choose one of {', '.join(list_models())}")
    model = _METHODS[method](**kwargs)
    model.method = method
    model.model_kwargs = model.record_kwargs(dict(kwargs))
    return model
