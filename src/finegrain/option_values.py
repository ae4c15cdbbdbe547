"""How an option is declared (:func:`option`), read from a command-line word, and checked.

One check of every option's value, wherever it comes from (command line, YAML, Python): the option's declared type
decides. Before it, ``--lr inf``, ``--input-size -5`` and YAML ``epochs: "three"`` crashed with a traceback deep in
training, and ``--input-size 0``, ``epochs: true`` and ``--workers -1`` were silently taken (the hostile-files
issue); now each is refused with the key, what it got and what it takes.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import field
from typing import Any

import yaml

from finegrain.errors import ConfigError

#: the range of every size-like option: a value outside it is refused with the range (0 or 10,000 px is a typo)
BOUNDS = {"input_size": (32, 1024), "batch_size": (1, 4096), "epochs": (1, 100_000), "workers": (0, 64)}
_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict}


def check_value(key: str, value: Any, annotation: str) -> Any:
    """``value`` as option ``key`` declares it (``int | None``, ``float`` ...), from the command line or a YAML file:
    whole numbers for counts (3.0 is 3; 1.7 and true are refused), finite numbers, no quoted numbers; else a
    :class:`ConfigError` naming the key, what it got and what it takes."""
    kinds = [k.strip().split("[")[0] for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    want = next((_TYPES[k] for k in kinds if k in _TYPES), None)
    if want is None:
        return value
    kind = {int: "a whole number", float: "a number"}.get(want, f"a {want.__name__}")
    bad = ConfigError(f"{key}: expected {kind}{' or none' if 'None' in kinds else ''}, got {value!r} "
                      f"({type(value).__name__})")  # fmt: skip
    if want in (int, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise bad
    if want is int:
        if not float(value).is_integer():
            raise bad
        value = int(value)
    elif want is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
    elif not isinstance(value, want):
        raise bad
    low, high = BOUNDS.get(key, (None, None))
    if low is not None and not low <= value <= high:
        raise ConfigError(f"{key}: {value} is outside {low}-{high}")
    return value


# How a command-line word becomes a value, for the options whose type is not a plain number or string.


def parse_key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    return key.replace("-", "_"), yaml.safe_load(value)


def parse_yaml_list(text: str) -> list:
    value = yaml.safe_load(text)
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a YAML list such as '[{{epochs: 2}}, {{epochs: 3}}]', got '{text}'")
    return value


def parse_optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "0", "off") else float(text)


def parse_auto_float(text: str) -> float | None:
    """A number, or ``auto`` (None: whoever runs the options decides; ``0`` is a number, not auto)."""
    if text.lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got '{text}'") from None


def option(default: Any, help: str, **cli: Any) -> Any:
    """A field with its help text; ``cli`` holds argparse settings (``type``, ``nargs``, ``choices``, ``metavar``)
    for options whose default does not say how to read them."""
    meta = {"help": help, "cli": cli}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def require(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
