"""Compression recipes callable from the library: prune then fine-tune, and quantization-aware fine-tuning then
int8 export. ``finegrain prune`` / ``finegrain qat`` and ``benchmarks/deploy.py`` run these."""

from __future__ import annotations

from pathlib import Path

from finegrain.checkpoint import Checkpoint
from finegrain.compress.prune import prune_checkpoint
from finegrain.engine.train import fit
from finegrain.run_layout import RunDir


def finetune_pruned(pruned: str | Path, epochs: int, lr: float = 1e-4, run_dir: str | Path | None = None) -> Path:
    """Fine-tune a pruned checkpoint (whole network, its run's recipe otherwise); returns the new best.pt."""
    ckpt = Checkpoint.load(pruned)
    cfg = ckpt.train_config().replace(init_from=str(ckpt.path), freeze_backbone=False, epochs=epochs, lr=lr,
                                      run_dir=str(run_dir) if run_dir else None)  # fmt: skip
    return fit(cfg).run_dir / RunDir.BEST


def prune_and_finetune(
    checkpoint: str | Path, ratio: float, epochs: int = 0, lr: float = 1e-4, importance: str = "activation",
    out: str | Path | None = None, run_dir: str | Path | None = None,
) -> dict:  # fmt: skip
    """Prune ``ratio`` of the expansion channels, then (``epochs`` > 0) fine-tune; ``finetuned``: its best.pt."""
    result = prune_checkpoint(checkpoint, ratio, out, importance=importance)
    if epochs > 0:
        result["finetuned"] = str(finetune_pruned(result["path"], epochs, lr, run_dir))
    return result


def qat_finetune(
    checkpoint: str | Path, epochs: int = 1, lr: float = 1e-5, batch_size: int | None = None,
    calib_images: int = 256, int8_target: str = "auto", run_dir: str | Path | None = None,
) -> Path:  # fmt: skip
    """Fine-tune a checkpoint while simulating ONNX Runtime's int8 rounding; returns the QAT run's best.pt."""
    ckpt = Checkpoint.load(checkpoint)
    overrides = {"init_from": str(ckpt.path), "freeze_backbone": False, "qat": True, "amp": "none", "epochs": epochs,
                 "lr": lr, "warmup_epochs": 0.0, "calib_images": calib_images, "int8_target": int8_target,
                 "run_dir": str(run_dir) if run_dir else None}  # fmt: skip
    if batch_size:
        overrides["batch_size"] = batch_size
    return fit(ckpt.train_config().replace(**overrides)).run_dir / RunDir.BEST
