"""finegrain's optional parts (pip extras) and the one error a missing one gives.

``pip install finegrain`` trains, evaluates and predicts with PyTorch alone; serving, ONNX export and compression,
plots and tar shards are extras, so that a user who only trains does not install a web server, ONNX and matplotlib
(the library issue: the full set made every install pull them in). Code that needs an extra asks :func:`need` first:
a missing extra is a one-line error naming the command to run, never an ImportError traceback; :func:`has` lets
optional outputs (a run's curves picture) be skipped with a note instead.
"""

from __future__ import annotations

import functools
import importlib.util

from finegrain.errors import FinegrainError

#: extra -> the modules it installs (import names), as declared in pyproject.toml's optional dependencies
EXTRAS = {
    "serve": ("fastapi", "uvicorn", "multipart", "prometheus_client", "fastapi_offline"),
    "export": ("onnx", "onnxruntime", "torch_pruning"),
    "plots": ("matplotlib",),
    "shards": ("webdataset",),
}


class MissingExtraError(FinegrainError):
    """A feature ran whose extra is not installed."""


@functools.cache
def has(extra: str) -> bool:
    """Whether every module of ``extra`` can be imported here."""
    return all(importlib.util.find_spec(m) is not None for m in EXTRAS[extra])


def need(extra: str, purpose: str) -> None:
    """Raise :class:`MissingExtraError` naming the install command when ``extra`` is missing."""
    if not has(extra):
        missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
        raise MissingExtraError(
            f"{purpose} needs finegrain's '{extra}' extra ({', '.join(missing)} not installed): "
            f"pip install 'finegrain[{extra}]'"
        )
