"""Checkpoints that carry everything needed to predict: weights, classes, method config, preprocessing.

Written atomically (temp file + rename) so a killed run never leaves half a file; read with
``weights_only=True``, so loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from finegrain import __version__
from finegrain.data.transforms import Preprocess
from finegrain.errors import CheckpointError
from finegrain.models import create_model
from finegrain.torchfile import load_tensors

FORMAT_VERSION = 1


def save_atomic(obj: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def model_record(model: nn.Module, classes: list[str]) -> dict:
    """The part of a checkpoint that rebuilds and runs the model without the dataset."""
    kwargs = {k: v for k, v in model.model_kwargs.items() if k not in ("pretrained", "weights")}
    record = {
        "format_version": FORMAT_VERSION,
        "finegrain_version": __version__,
        "method": model.method,
        "model_kwargs": kwargs,
        "classes": list(classes),
        "preprocess": model.preprocess.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if getattr(model, "pruned", False):
        from finegrain.compress.prune import structure

        record["structure"] = structure(model)  # channel counts: rebuilds the pruned shapes on load
    return record


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist (pass a .pt file or a run directory)")
    fix = "pass a best.pt or last.pt that `finegrain train` wrote, or its run directory"
    if path.name == "last.pt":
        fix += "; best.pt beside it may still be whole"
    ckpt = load_tensors(path, "checkpoint", fix)
    if not isinstance(ckpt, dict) or "method" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"'{path}' is not a finegrain checkpoint (no method / state_dict)")
    ckpt["path"] = str(path)
    return ckpt


def load_weights(model: nn.Module, ckpt: dict) -> nn.Module:
    """Load a checkpoint's weights strictly, first reshaping the model if the checkpoint was pruned."""
    if "structure" in ckpt:
        from finegrain.compress.prune import apply_structure

        apply_structure(model, ckpt["structure"])
        model.pruned = True
        if getattr(model, "freeze_backbone", False):
            model.backbone.requires_grad_(False)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the weights of '{ckpt.get('path')}' do not fit this model: {e}") from e
    return model


def build_model(ckpt: dict) -> nn.Module:
    """Rebuild the model of a checkpoint (no download, no dataset) and load its weights strictly."""
    model = create_model(ckpt["method"], pretrained=False, **ckpt["model_kwargs"])
    load_weights(model, ckpt)
    model.preprocess = Preprocess.from_dict(ckpt["preprocess"])
    return model.eval()


def checkpoint_dataset(ckpt: dict, data: str | Path | None = None):
    """The dataset a checkpoint was trained on, with the exact split its run saved (``split.csv``).

    ``data`` overrides the recorded path (e.g. the same data mounted elsewhere); the classes must match.
    """
    from finegrain.data import load_dataset
    from finegrain.errors import DataError

    cfg = ckpt.get("config", {})
    data = data or cfg.get("data")
    if data is None:
        raise DataError("the checkpoint does not record its dataset: pass --data PATH")
    index = load_dataset(
        data, cfg.get("format", "auto"), cfg.get("val_fraction", 0.1), cfg.get("test_fraction", 0.2),
        cfg.get("seed", 0), split_file=Path(ckpt["path"]).parent / "split.csv",
    )  # fmt: skip
    if index.classes != ckpt["classes"]:
        raise DataError(
            f"the classes of '{data}' ({len(index.classes)}) differ from the checkpoint's "
            f"({len(ckpt['classes'])}): use the dataset the model was trained on"
        )
    return index
