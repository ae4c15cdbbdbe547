"""``textprior``: the baseline whose classifier is built from what is known about each class (attributes, words).

A class's weight vector is ``P^T e_c + r_c``: the class embedding ``e_c`` (``class_embed``) brought into image-
feature space by one projection ``P`` shared by all classes (ALE / DeViSE-style compatibility, learned with
softmax cross-entropy), plus a free residual ``r_c`` for the classes that have training photos. With few photos
per class, ``P`` carries what the classes' descriptions share; with many, the residual makes it the plain linear
classifier again. A class with no photos at all is scored through ``P`` alone (zero-shot), and a class known by a
reference image gets that image's normalised features as its residual (weight imprinting, Qi et al. 2018):
``add_classes``. Measured in docs/multimodal.md (``benchmarks/multimodal.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from finegrain.errors import ConfigError
from finegrain.models.baseline import Baseline
from finegrain.models.class_embed import EmbeddingSpec
from finegrain.models.registry import register_model


class ClassEmbeddingHead(nn.Module):
    """logits_c = (P f)·e_c + r_c·f + b_c on L2-normalised features f; ``seen`` marks classes trained on photos."""

    def __init__(self, in_features: int, class_embed: torch.Tensor, drop_rate: float = 0.2) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.proj = nn.Linear(in_features, class_embed.shape[1], bias=False)
        self.residual = nn.Linear(in_features, len(class_embed))
        nn.init.zeros_(self.residual.weight)
        self.register_buffer("class_embed", class_embed.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.drop(F.normalize(x.float(), dim=1))
        return self.proj(f) @ self.class_embed.T + self.residual(f)

    def evidence(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per embedding dimension, what it added to the logit of each row's class: (B, dim)."""
        return self.proj(F.normalize(x.float(), dim=1)) * self.class_embed[labels]


class TextPrior(Baseline):
    embedding: EmbeddingSpec

    def __init__(self, num_classes: int, embedding: dict | None = None, class_embed: torch.Tensor | None = None,
                 drop_rate: float = 0.2, **kwargs) -> None:  # fmt: skip
        if embedding is None:
            raise ConfigError("textprior scores classes by what is known about them: give a class_info folder "
                              "(--class-info DIR, or DATA/class_info) with descriptions and/or attributes")  # fmt: skip
        super().__init__(num_classes, drop_rate, **kwargs)
        self.embedding = EmbeddingSpec.from_dict(embedding)
        if class_embed is None:  # rebuilt from a checkpoint: the buffer is loaded next
            class_embed = torch.zeros(num_classes, self.embedding.dim)
        if class_embed.shape != (num_classes, self.embedding.dim):
            raise ConfigError(f"class embeddings of shape {tuple(class_embed.shape)}, expected "
                              f"({num_classes}, {self.embedding.dim})")  # fmt: skip
        self.head = ClassEmbeddingHead(self.backbone.num_features, class_embed, drop_rate)

    def record_kwargs(self, kwargs: dict) -> dict:
        return {k: v for k, v in kwargs.items() if k != "class_embed"}  # the embeddings are a buffer

    def probe_head(self) -> None:
        return None  # the projection and residuals train by gradient (sgd epochs on cached features)

    @torch.no_grad()
    def class_evidence(self, x: torch.Tensor, labels: list[int], k: int = 5) -> list[list[dict]]:
        names = self.embedding.attributes
        if not names:  # text dimensions have no names: only attribute columns can be listed
            return [[] for _ in labels]
        per_dim = self.head.evidence(self.backbone_features(x), torch.as_tensor(labels))[:, : len(names)]
        top = per_dim.topk(min(k, len(names)), dim=1)
        return [[{"name": names[j], "contribution": float(v)} for v, j in zip(vs, ix, strict=True) if v > 0]
                for vs, ix in zip(top.values.tolist(), top.indices.tolist(), strict=True)]  # fmt: skip

    @torch.no_grad()
    def add_classes(self, class_embed: torch.Tensor, prototypes: torch.Tensor | None = None) -> None:
        """Append classes known by their embedding (zero-shot) and, where given (a row of ``prototypes`` that is
        not all zero), by a reference image's features (imprinted into the residual at the mean norm of the
        trained residuals). Their bias is the trained classes' mean, so no class starts ahead."""
        head = self.head
        n, feat = len(class_embed), head.residual.in_features
        residual = torch.zeros(n, feat)
        if prototypes is not None:
            norm = head.residual.weight.norm(dim=1).mean().clamp_min(1.0)
            residual = F.normalize(prototypes.float(), dim=1) * norm
        new = nn.Linear(feat, head.residual.out_features + n)
        new.weight.copy_(torch.cat([head.residual.weight, residual]))
        new.bias.copy_(torch.cat([head.residual.bias, head.residual.bias.mean().expand(n)]))
        head.residual = new
        head.class_embed = torch.cat([head.class_embed, class_embed.float()])
        self.model_kwargs["num_classes"] = len(head.class_embed)  # a checkpoint of it rebuilds every class


@register_model("textprior", needs_class_info=True)
def textprior(num_classes: int, **kwargs) -> TextPrior:
    """Classifier built from class descriptions or attributes (class_info/): zero-shot and added classes."""
    return TextPrior(num_classes=num_classes, **kwargs)
