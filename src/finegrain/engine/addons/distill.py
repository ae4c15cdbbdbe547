"""Knowledge distillation (``finegrain distill``): the averaged soft labels of teacher checkpoints, at
temperature T, join the cross-entropy with the true labels.

Where the soft labels of training images come from (``--kd-targets``):

- online: on images, the teachers run on every batch, on the view the student sees (the usual distillation);
- fixed: the teachers label each training image once, at its evaluation view, and every augmented view of it
  learns that label: the noisy student's soft pseudo-labels (Xie et al., 2020), with no teacher pass per batch, so a
  ``--budget`` run fine-tunes for as many epochs as without teachers (``auto``: fixed with ``--unlabeled``).

With a frozen, cached student backbone the soft labels are stored beside the cached features: online, the
teachers' on each cached view (plain and mirrored); fixed, each image's at its evaluation view for both. Teachers'
outputs are cached like features (``finegrain.engine.teachers``). With ``--unlabeled`` the same teachers
pseudo-label the unlabelled images first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from finegrain.config import TrainConfig
from finegrain.data import Sample
from finegrain.data.source import data_source
from finegrain.data.transforms import Preprocess
from finegrain.engine import distributed as fgdist
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

    @classmethod
    def online(cls, cfg: TrainConfig) -> bool:
        """Whether the teachers run on every training batch of images (``--kd-targets``, resolved)."""
        targets = cfg.distill.kd_targets
        return targets == "online" or (targets == "auto" and cfg.labels.unlabeled is None)

    def prepare(self, ctx: Context) -> None:
        """Load the teachers, refused (before any feature extraction) when trained on other classes."""
        if not self.online(self.cfg):
            data_source(ctx.index).require_listed(
                "--kd-targets fixed labels every training image before training",
                "add --kd-targets online, or train from a local shard folder",
            )
        self.teachers = load_teachers(ctx)
        self.student = ctx.model  # its preprocessing now: progressive stages change the input size

    def sample_columns(self, ctx: Context, samples: Sequence[Sample], views: Sequence[bool],
                       images: bool) -> list[torch.Tensor]:  # fmt: skip
        """Soft labels: the teachers' softmax at the distillation temperature, averaged over teachers. Online, one
        row per cached view (none for images: the teachers run on every batch instead); fixed, each image's label
        at its evaluation view, for every view: on cub100 with 2,804 training images, teaching the mirrored view too
        took 100 s of the student's head stage, and its fine-tuning missed an 8-minute budget by 6 s."""
        online, t = self.online(self.cfg), self.cfg.distill.kd_temperature
        if self._per_batch(images):
            return []

        def rows() -> torch.Tensor:
            if not online:
                return teacher_probs(ctx, self.teachers, samples, t).repeat(len(views), 1)
            return torch.cat([teacher_probs(ctx, self.teachers, samples, t, flip) for flip in views])

        return [fgdist.main_first(ctx.info, rows)]  # rank 0 computes and caches, the others read the cache

    def _per_batch(self, images: bool) -> bool:
        """Whether the teachers label each batch as it comes (online, on images) instead of a stored column."""
        return images and self.online(self.cfg)

    @torch.no_grad()
    def _soft_labels(self, x: torch.Tensor) -> torch.Tensor:
        t = self.cfg.distill.kd_temperature
        probs = [(m(teacher_input(x, self.student.preprocess, pre)).float() / t).softmax(1) for m, pre in self.teachers]
        return torch.stack(probs).mean(0)

    def criterion(self, base: Criterion, x: torch.Tensor, batch: Sequence, images: bool) -> Criterion:
        soft = self._soft_labels(x) if self._per_batch(images) else batch[2].to(x.device)
        d = self.cfg.distill

        def kd(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return distillation_loss(logits, soft, target, d.kd_temperature, d.kd_alpha, teacher_probs=True)

        return kd
