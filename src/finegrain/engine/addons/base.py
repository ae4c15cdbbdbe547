"""The add-on contract: a few hooks, each doing nothing unless an add-on overrides it.

The training loop calls them in this order: ``prepare`` (the model may change: QAT, MixStyle; teachers are
loaded) -> ``train_transform`` (image path) and ``sample_columns`` while the task is built
-> ``attach`` (the built task) -> per epoch ``epoch_start`` / ``epoch_info`` / ``epoch_cost`` -> per batch
``batch`` then ``criterion``; ``state_dict`` / ``load_state_dict`` carry an add-on's state through ``last.pt``
so ``--resume`` is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from finegrain.config import TrainConfig
from finegrain.data import Sample
from finegrain.engine.context import Context

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class AddOn:
    name: ClassVar[str]
    #: True where the add-on only changes which images (and labels) the run trains on, at ``prepare``: the probe,
    #: which solves the head instead of training it, still applies. The others shape gradient training.
    data_only: ClassVar[bool] = False
    #: True where it also works when the last stages train on cached maps (``engine/map_task.py``), which refuses
    #: the other add-ons that shape training (they need images or features)
    on_maps: ClassVar[bool] = False
    #: the files it writes in the run directory (the recipe keeps them with the chosen stage; the add-on contract
    #: test checks a run writes no others)
    files: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def wanted(cls, cfg: TrainConfig) -> bool:
        """Whether ``cfg`` turns this add-on on."""
        raise NotImplementedError

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def prepare(self, ctx: Context) -> None:
        """Before the task is built: change the model, load what the add-on needs."""

    def train_transform(self, transform: Callable) -> Callable:
        """The training images' transform (image path only)."""
        return transform

    def sample_columns(self, ctx: Context, samples: Sequence[Sample], views: Sequence[bool],
                       images: bool) -> list[torch.Tensor]:  # fmt: skip
        """Per-sample tensors that travel with each training item, given to ``criterion`` as ``batch[2:]``: beside
        cached features (``images`` False: one row per sample and view, ``views`` the mirrorings), or beside each
        augmented image (``images`` True: one row per sample)."""
        return []

    def attach(self, ctx: Context, task) -> None:
        """After the task (``finegrain.engine.task.Task``) is built."""

    def epoch_start(self, ctx: Context, task, epoch: int) -> bool:
        """At the start of epoch ``epoch`` (0-based); True when the task's datasets were replaced."""
        return False

    def epoch_info(self, epoch: int) -> dict:
        """Entries for the epoch's metrics row."""
        return {}

    def epoch_cost(self, epoch: int, planned: int) -> float:
        """Epoch ``epoch``'s (0-based) time under a plan of ``planned`` epochs, relative to an epoch this add-on
        leaves alone: ``--replan-epochs`` plans with it where epochs differ (``low_res.py``)."""
        return 1.0

    def batch(self, x: torch.Tensor, images: bool) -> torch.Tensor:
        """A training batch, before the forward pass."""
        return x

    def criterion(self, base: Criterion, x: torch.Tensor, batch: Sequence, images: bool) -> Criterion:
        """The loss on logits for this batch (``x`` as the model saw it)."""
        return base

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
