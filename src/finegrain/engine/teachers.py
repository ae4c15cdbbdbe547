"""Teacher checkpoints (``--teachers``): loaded for this run's classes, and their averaged softmax on images,
cached like features. Distillation puts the soft labels in the loss; ``--unlabeled`` lets them pseudo-label
unlabelled images instead of a probe fitted on the labels (the noisy-student round of self-training).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from finegrain.checkpoint import Checkpoint
from finegrain.data import Sample
from finegrain.data.transforms import Preprocess
from finegrain.engine.context import Context
from finegrain.engine.task import run_features
from finegrain.errors import CheckpointError

Teachers = list[tuple[nn.Module, Preprocess]]


class _Logits(nn.Module):
    """A whole model seen as a 'backbone' whose features are its logits: caches teacher outputs with the
    feature cache (keyed by every weight of the teacher, its preprocessing and the files)."""

    feature_spec = "logits"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def load_teachers(ctx: Context) -> Teachers:
    """The run's ``--teachers`` as (model in eval mode, its preprocessing); refused when trained on other classes."""
    teachers = []
    for path in ctx.cfg.distill.teachers:
        ckpt = Checkpoint.load(path)
        if ckpt.classes != ctx.index.classes:
            raise CheckpointError(f"teacher {path} was trained on other classes than '{ctx.cfg.dataset.data}'")
        if warning := own_labels_warning(path, ckpt.config, ctx.cfg.labels.unlabeled):
            ctx.log(warning)
        teachers.append((ckpt.build_model().to(ctx.device).eval(), ckpt.preprocess))
    return teachers


def own_labels_warning(path: str, config: dict, unlabeled: str | None) -> str:
    """A line for a teacher of ``--unlabeled`` images that itself trained on pseudo-labels of the same images, else
    "": it fitted them and hands them back, so a second round learns nothing new (on cub100 the student's head and
    its fine-tuned network each gave all 2,024 of the first round's labels back unchanged, docs/unlabeled.md)."""
    own = (config.get("labels") or {}).get("unlabeled")
    if unlabeled is None or own is None or Path(own).expanduser().resolve() != Path(unlabeled).expanduser().resolve():
        return ""
    return (f"warning: teacher {path} trained on pseudo-labels of these --unlabeled images itself, so it mostly "
            "hands them back (on cub100 a second round got all 2,024 of the first round's labels back unchanged): "
            "teach with runs that did not train on them, e.g. the labels-only run's stages")  # fmt: skip


def teacher_probs(ctx: Context, teachers: Teachers, samples: Sequence[Sample], temperature: float = 1.0,
                  flip: bool = False) -> torch.Tensor:  # fmt: skip
    """The teachers' softmax at ``temperature`` on ``samples`` (each at its own view), averaged over teachers."""
    probs = [(run_features(ctx, samples, pre, flip, "teacher", _Logits(model)) / temperature).softmax(1)
             for model, pre in teachers]  # fmt: skip
    return torch.stack(probs).mean(0)
