"""Losses that FGVC methods add to cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_ranking_loss(p_coarse: torch.Tensor, p_fine: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
    """RA-CNN's inter-scale ranking: mean of max(0, p_coarse - p_fine + margin) over the batch, where p is
    each scale's probability of the true class; it pushes the finer scale to be more confident."""
    return F.relu(p_coarse - p_fine + margin).mean()
