"""Knowledge distillation (``finegrain distill``): the averaged soft labels of teacher checkpoints, at
temperature T, join the cross-entropy with the true labels.

On images the teachers run on every batch (as the student saw it); with a frozen, cached student backbone the
views are fixed, so the teachers' soft labels are computed once, cached like features, and stored beside them
(``finegrain.engine.teachers``). With ``--unlabeled`` the same teachers pseudo-label the unlabelled images first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from finegrain.config import TrainConfig
from finegrain.data import Sample
from finegrain.data.transforms import Preprocess
from finegrain.engine.addons.base import AddOn, Criterion
from finegrain.engine.context import Context
from finegrain.engine.teachers import load_teachers, teacher_probs
from finegrain.losses import distillation_loss


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
        return bool(cfg.distill.teachers) and cfg.distill.kd_alpha > 0  # at 0 they only pseudo-label --unlabeled

    def prepare(self, ctx: Context) -> None:
        """Load the teachers, refused (before any feature extraction) when trained on other classes."""
        self.teachers = load_teachers(ctx)
        self.student = ctx.model  # its preprocessing now: progressive stages change the input size

    def cached_columns(self, ctx: Context, samples: Sequence[Sample], views: Sequence[bool]) -> list[torch.Tensor]:
        """Soft labels: the teachers' softmax at the distillation temperature, averaged over teachers."""
        t = self.cfg.distill.kd_temperature
        return [torch.cat([teacher_probs(ctx, self.teachers, samples, t, flip) for flip in views])]

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
