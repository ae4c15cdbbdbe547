"""The run-artifact layer: a typed ``Checkpoint`` that loads, saves and rebuilds what a run produced.

A checkpoint carries everything needed to predict without the dataset (weights, classes, method and its
options, preprocessing, a pruned model's channel counts) and, when a run wrote it, the run's configuration,
so the same object also gives back the run's dataset with its exact split and the images that calibrate int8
models. ``engine``, ``export``, ``compress``, ``predict`` and ``serve`` all go through it.

Files are written atomically (temp file + rename) so a killed run never leaves half a file, and read with
``weights_only=True`` (``finegrain.torchfile``), so loading one never runs pickled code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from finegrain import __version__
from finegrain.atomic import atomic_path
from finegrain.config import TrainConfig
from finegrain.data import DatasetIndex, Sample, load_dataset
from finegrain.data.calibration import evenly_spaced
from finegrain.data.transforms import Preprocess
from finegrain.errors import CheckpointError, DataError
from finegrain.models import create_model
from finegrain.models.pruned import apply_structure, structure
from finegrain.run_layout import RunDir
from finegrain.torchfile import load_tensors

FORMAT_VERSION = 1


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) record: about the size ``torch.save`` writes."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_atomic(obj: dict, path: str | Path) -> None:
    """``torch.save`` whole or not at all (finegrain.atomic): a full disk is a clear error, the old file stays."""
    with atomic_path(path, tensor_bytes(obj)) as tmp:
        torch.save(obj, tmp)


@dataclass
class Checkpoint:
    method: str
    model_kwargs: dict
    classes: list[str]
    preprocess: Preprocess
    state_dict: dict[str, torch.Tensor]
    #: the training run's options, grouped as ``TrainConfig.to_dict`` writes them ({} for a bare model)
    config: dict = field(default_factory=dict)
    epoch: int | None = None
    metrics: dict | None = None
    #: channel counts of a pruned model (``finegrain.models.pruned``); None when unpruned
    structure: dict | None = None
    #: optimiser, EMA, add-on and RNG state: only in ``last.pt``, for ``--resume``
    resume: dict | None = None
    path: Path | None = None
    finegrain_version: str = __version__

    # -- building ---------------------------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, classes: list[str], **extra: Any) -> Checkpoint:
        """The predict-ready record of ``model`` (weights copied to CPU)."""
        kwargs = {k: v for k, v in model.model_kwargs.items() if k not in ("pretrained", "weights")}
        return cls(
            method=model.method,
            model_kwargs=kwargs,
            classes=list(classes),
            preprocess=model.preprocess,
            state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
            structure=structure(model) if model.pruned else None,
            **extra,
        )

    def build_model(self) -> nn.Module:
        """The model, rebuilt without download or dataset, weights loaded strictly, in eval mode."""
        model = create_model(self.method, pretrained=False, **self.model_kwargs)
        self.load_into(model)
        model.preprocess = self.preprocess
        return model.eval()

    def load_into(self, model: nn.Module) -> nn.Module:
        """Load the weights strictly into ``model``, first reshaping it if the checkpoint was pruned."""
        if self.structure is not None:
            apply_structure(model, self.structure)
            model.pruned = True
            if model.freeze_backbone:
                model.backbone.requires_grad_(False)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"the weights of '{self.path}' do not fit this model: {e}") from e
        return model

    # -- files ------------------------------------------------------------------------------------------------

    def to_record(self) -> dict:
        record = {
            "format_version": FORMAT_VERSION,
            "finegrain_version": self.finegrain_version,
            "method": self.method,
            "model_kwargs": self.model_kwargs,
            "classes": self.classes,
            "preprocess": self.preprocess.to_dict(),
            "state_dict": self.state_dict,
            "config": self.config,
        }
        optional = {"epoch": self.epoch, "metrics": self.metrics, "structure": self.structure, "resume": self.resume}
        record.update({k: v for k, v in optional.items() if v is not None})
        return record

    def save(self, path: str | Path) -> Path:
        save_atomic(self.to_record(), path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """A ``.pt`` file, or a run directory (its ``best.pt``)."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / RunDir.BEST
        if not path.is_file():
            raise CheckpointError(f"checkpoint '{path}' does not exist (pass a .pt file or a run directory)")
        fix = f"pass a {RunDir.BEST} or {RunDir.LAST} that `finegrain train` wrote, or its run directory"
        if path.name == RunDir.LAST:
            fix += f"; {RunDir.BEST} beside it may still be whole"
        record = load_tensors(path, "checkpoint", fix)
        if not isinstance(record, dict) or "method" not in record or "state_dict" not in record:
            raise CheckpointError(f"'{path}' is not a finegrain checkpoint (no method / state_dict)")
        try:
            return cls(
                method=record["method"], model_kwargs=dict(record.get("model_kwargs", {})),
                classes=list(record["classes"]), preprocess=Preprocess.from_dict(record["preprocess"]),
                state_dict=record["state_dict"], config=record.get("config") or {}, epoch=record.get("epoch"),
                metrics=record.get("metrics"), structure=record.get("structure"), resume=record.get("resume"),
                path=path, finegrain_version=record.get("finegrain_version", "?"),
            )  # fmt: skip
        except (KeyError, TypeError) as e:
            whole = f"'{path}' is not a whole finegrain checkpoint ({type(e).__name__}: {e})"
            raise CheckpointError(f"{whole}: {fix}") from e

    # -- the run behind it ------------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path | None:
        return self.path.parent if self.path is not None else None

    def train_config(self) -> TrainConfig | None:
        """The run's options, read through ``TrainConfig`` (None for a checkpoint no run wrote)."""
        return TrainConfig.from_dict(self.config) if self.config else None

    def dataset(self, data: str | Path | None = None) -> DatasetIndex:
        """The dataset the run trained on, with the exact split it saved (``split.csv`` beside the file).

        ``data`` overrides the recorded path (e.g. the same data mounted elsewhere); the classes must match.
        """
        cfg = self.train_config()
        data = data or (cfg.dataset.data if cfg else None)
        if data is None:
            raise DataError("the checkpoint does not record its dataset: pass --data PATH")
        d = cfg.dataset if cfg else TrainConfig().dataset
        seed = cfg.run.seed if cfg else 0
        split_file = self.run_dir / RunDir.SPLIT if self.run_dir else None
        index = load_dataset(data, d.format, d.val_fraction, d.test_fraction, seed, split_file=split_file,
                             follow_symlinks=d.follow_symlinks)  # fmt: skip
        if index.classes != self.classes:
            raise DataError(
                f"the classes of '{data}' ({len(index.classes)}) differ from the checkpoint's "
                f"({len(self.classes)}): use the dataset the model was trained on"
            )
        return index

    def training_samples(self, data: str | Path | None = None) -> list[Sample]:
        """The training split of the run's dataset (never its validation or test images)."""
        train = self.dataset(data).split("train")
        if not train:
            raise DataError("the checkpoint's dataset has no training images for calibration")
        return train

    def calibration_samples(self, count: int = 256, data: str | Path | None = None) -> list[Sample]:
        """``count`` training images, evenly spread over the classes: what int8, QAT and pruning calibrate on."""
        return evenly_spaced(self.training_samples(data), count)
