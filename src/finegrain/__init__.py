"""finegrain: fine-grained image classification toolkit.

``import finegrain`` imports nothing heavy: the names below are looked up in their modules on first use (PEP 562),
so ``finegrain --help`` and ``finegrain.__version__`` do not wait for PyTorch. What each name resolves to is
declared in ``_LAZY``, the one place the package root depends on the rest (tests/test_architecture.py reads it).
"""

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "load": "finegrain.api",
    "train": "finegrain.api",
    "create_model": "finegrain.models",
    "list_models": "finegrain.models",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'finegrain' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
