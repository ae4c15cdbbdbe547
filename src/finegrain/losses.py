"""Losses that FGVC methods add to cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_ranking_loss(p_coarse: torch.Tensor, p_fine: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
    """RA-CNN's inter-scale ranking: mean of max(0, p_coarse - p_fine + margin) over the batch, where p is
    each scale's probability of the true class; it pushes the finer scale to be more confident."""
    return F.relu(p_coarse - p_fine + margin).mean()


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.5,
    teacher_probs: bool = False,
) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): ``alpha`` * T² * KL(teacher_T || student_T) + (1 - alpha) *
    CE(student, target). ``teacher`` is logits, or probabilities with ``teacher_probs`` (e.g. averaged over
    several teachers). T² keeps the soft term's gradient scale independent of T."""
    log_p = F.log_softmax(student.float() / temperature, dim=1)
    q = teacher.float() if teacher_probs else F.softmax(teacher.float() / temperature, dim=1)
    soft = F.kl_div(log_p, q, reduction="batchmean") * temperature**2
    return alpha * soft + (1 - alpha) * F.cross_entropy(student.float(), target)


class CenterLoss(torch.nn.Module):
    """Center loss (Wen et al. 2016) on L2-normalised features: mean squared distance of each feature to its
    class centre; the centres (a buffer, not a parameter) move toward their classes' features at rate ``beta``."""

    def __init__(self, num_classes: int, dim: int, beta: float = 0.05) -> None:
        super().__init__()
        self.beta = beta
        self.register_buffer("centers", torch.zeros(num_classes, dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features.float().flatten(1), dim=1)
        if self.training:
            with torch.no_grad():
                for c in target.unique():
                    mean = f[target == c].mean(0)
                    # a class seen for the first time starts at its features rather than at the origin
                    self.centers[c] = (
                        mean if not self.seen[c] else self.centers[c] + self.beta * (mean - self.centers[c])
                    )
                    self.seen[c] = True
        return (f - self.centers[target]).pow(2).sum(1).mean()
