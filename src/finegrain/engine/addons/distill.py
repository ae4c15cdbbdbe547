"""Knowledge distillation (``finegrain distill``): the averaged soft labels of teacher checkpoints, at
temperature T, join the cross-entropy with the true labels.

On images the teachers run on every batch (as the student saw it); with a frozen, cached student backbone the
views are fixed, so the teachers' soft labels are computed once, cached like features, and stored beside them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from finegrain.checkpoint import Checkpoint
from finegrain.config import TrainConfig
from finegrain.data import Sample
from finegrain.data.transforms import Preprocess
from finegrain.engine.addons.base import AddOn, Criterion
from finegrain.engine.context import Context
from finegrain.engine.features import extract_features
from finegrain.errors import CheckpointError
from finegrain.losses import distillation_loss


class _Logits(nn.Module):
    """A whole model seen as a 'backbone' whose features are its logits: caches teacher outputs with the
    feature cache (keyed by every weight of the teacher, its preprocessing and the files)."""

    feature_spec = "logits"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def teacher_input(x: torch.Tensor, student: Preprocess, teacher: Preprocess) -> torch.Tensor:
    """The student's normalised batch as the teacher expects it: renormalised and resized if they differ."""
    if (student.mean, student.std) != (teacher.mean, teacher.std):
        s_mean, s_std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (student.mean, student.std))
        t_mean, t_std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (teacher.mean, teacher.std))
        x = ((x * s_std + s_mean) - t_mean) / t_std
    if teacher.input_size != x.shape[-1]:
        x = nn.functional.interpolate(x, size=teacher.input_size, mode="bilinear", align_corners=False)
    return x


class DistillAddOn(AddOn):
    name = "distill"

    @classmethod
    def wanted(cls, cfg: TrainConfig) -> bool:
        return bool(cfg.distill.teachers)

    def prepare(self, ctx: Context) -> None:
        """Load the teachers, refused (before any feature extraction) when trained on other classes."""
        self.teachers: list[tuple[nn.Module, Preprocess]] = []
        for path in self.cfg.distill.teachers:
            ckpt = Checkpoint.load(path)
            if ckpt.classes != ctx.index.classes:
                raise CheckpointError(f"teacher {path} was trained on other classes than '{self.cfg.dataset.data}'")
            self.teachers.append((ckpt.build_model().to(ctx.device).eval(), ckpt.preprocess))
        self.student = ctx.model  # its preprocessing now: progressive stages change the input size

    def cached_columns(self, ctx: Context, samples: Sequence[Sample], views: Sequence[bool]) -> list[torch.Tensor]:
        """Soft labels: the teachers' softmax at the distillation temperature, averaged over teachers."""
        cfg, t = self.cfg, self.cfg.distill.kd_temperature
        per_view = []
        for flip in views:
            probs = []
            for model, pre in self.teachers:
                kw = dict(amp=ctx.amp, channels_last=cfg.speed.channels_last, workers=cfg.speed.workers,
                          cache_dir=cfg.features.cache_dir)  # fmt: skip
                logits = extract_features(_Logits(model), samples, pre, ctx.device, flip=flip, desc="teacher", **kw)
                probs.append((logits / t).softmax(1))
            per_view.append(torch.stack(probs).mean(0))
        return [torch.cat(per_view)]

    @torch.no_grad()
    def _soft_labels(self, x: torch.Tensor) -> torch.Tensor:
        t = self.cfg.distill.kd_temperature
        probs = [(m(teacher_input(x, self.student.preprocess, pre)).float() / t).softmax(1) for m, pre in self.teachers]
        return torch.stack(probs).mean(0)

    def criterion(self, base: Criterion, x: torch.Tensor, batch: Sequence, images: bool) -> Criterion:
        soft = self._soft_labels(x) if images else batch[2].to(x.device)
        d = self.cfg.distill

        def kd(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return distillation_loss(logits, soft, target, d.kd_temperature, d.kd_alpha, teacher_probs=True)

        return kd
