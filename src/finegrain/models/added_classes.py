"""A probe head that also scores classes added after training (``finegrain classes add``), in two steps.

1. **Gate**: is the photo nearer one of the new classes than any known class? Both sides are prototypes compared in
   the same space (``gate`` rows: the known classes' mean training features; ``added`` rows: the new classes'
   prototypes, both whitened and centred by ``engine/new_classes.py`` and folded into plain linear rows): the photo
   goes to a new class when ``max(added(x)) - max(gate(x)) > threshold``.
2. **Which class**: among the known classes, the trained head's own argmax (``known``); among the new ones, the
   nearest prototype.

The output is one row of logits over known + new classes whose argmax is exactly that decision: a new class's logit
is the top known logit plus ``sharpness`` times its gate margin. Why two steps instead of appending rows to the
linear head: a new class's score (a similarity to one photo) is on no common scale with a trained logit, and
comparing a new prototype with known *prototypes* instead gave the added classes 58% top-1 instead of 43% on cub100
at the same cost to the known ones (docs/multimodal.md). Every operation is a matrix product or a max, so the head
exports to ONNX like the plain one.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class AddedClassesLinear(nn.Module):
    """``known`` (the trained head's layer), ``gate`` (one row per known class) and ``added`` (one row per new class)
    on the head's L2-normalised features; ``threshold`` and ``sharpness`` as above."""

    def __init__(self, in_features: int, known: int, added: int) -> None:
        super().__init__()
        self.known = nn.Linear(in_features, known)
        self.gate = nn.Linear(in_features, known)
        self.added = nn.Linear(in_features, added)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("sharpness", torch.ones(()))
        self.in_features, self.out_features = in_features, known + added

    def gate_margin(self, x: torch.Tensor) -> torch.Tensor:
        """Per photo and new class: how far the class's prototype beats the nearest known prototype."""
        return self.added(x) - self.gate(x).max(1, keepdim=True).values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        known = self.known(x)
        top = known.max(1, keepdim=True).values
        return torch.cat([known, top + self.sharpness * (self.gate_margin(x) - self.threshold)], 1)
