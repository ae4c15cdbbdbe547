"""Datasets (CUB, ImageFolder, manifests), loading and preprocessing.

The names below are looked up in their modules on first use (PEP 562), so that the command line can read
``finegrain.data.records`` (formats, limits) for its help without importing PyTorch: ``finegrain --help`` went
from 13 s to under a second once nothing it imports pulled torch in (benchmarks/cli_speed.py).
"""

import importlib

#: public name -> the module that defines it
_LAZY = {
    "load_dataset": "datasets",
    "save_split": "datasets",
    "IMAGE_SUFFIXES": "loading",
    "ImageDataset": "loading",
    "find_bad_images": "loading",
    "list_images": "loading",
    "open_image": "loading",
    "open_sample": "loading",
    "DatasetIndex": "records",
    "Sample": "records",
    "Preprocess": "transforms",
    "eval_transform": "transforms",
    "train_transform": "transforms",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"finegrain.data.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'finegrain.data' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
