"""The method contract: what every finegrain method is and may declare, with the defaults the engine relies on.

A method is a backbone, then a trainable ``head`` on what ``backbone_features`` gives. Everything else the
engine, export and explain need from a method is declared here, with a default, so nothing outside the
models asks a model ``hasattr``:

- ``cacheable`` (opt-in): ``backbone_features`` depends on the image only, so a frozen backbone's features can
  be computed once and the head trained on them. A method whose views depend on trained parts (zooms, crops,
  attention) leaves it False and is trained on images.
- ``feature_spec``: names what ``backbone_features`` computes, so feature caches of different methods never mix.
- ``split_stages``: the backbone cut for partial fine-tuning on cached maps (default: refused).
- ``probe_head``: the linear layer a logistic-regression probe may fit directly (default: none).
- ``compute_loss``: the training loss from the training forward's output (default: cross-entropy on logits).
- ``extra_targets``: annotations a training image must bring (e.g. part boxes), as ``ImageDataset`` options.
- ``attention_boxes``: regions the method looked at, drawn by explain (default: none).
- ``explain_layer`` / ``activation_map``: what Grad-CAM weighs (default: the backbone's last spatial map;
  token backbones such as ViT lay their tokens out on the patch grid).
- ``embedding`` / ``add_classes``: how class side-information becomes class embeddings (None: the method uses
  none), and adding classes known only by it (zero-shot; ``finegrain predict --class-info``).
- ``class_evidence``: which named attributes drove a class's score (explain lists them).
- ``record_kwargs``: the construction arguments a checkpoint keeps (default: all of them).
- ``adapt_weights``: start from another method's checkpoint (``--init-from``), e.g. RA-CNN from a baseline.
- ``STAGE_SETTINGS``: method attributes a progressive-training stage may set.
- ``has_unused_parameters``: some steps leave parameters without gradient (DDP must be told).
- ``export_blocker``: why this configuration cannot become ONNX (None: it can).
- State that must survive ``--resume`` (counters, centres) lives in buffers or parameters, so checkpoints
  carry it; ``tests/test_contract.py`` checks resume is exact for every registered method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from finegrain.errors import ConfigError
from finegrain.models.backbone import (
    DEFAULT_BACKBONE,
    backbone_preprocess,
    create_backbone,
    is_concatenated,
    is_token_backbone,
)

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def no_class_prior(method: str) -> ConfigError:
    """The refusal of a method without class embeddings asked to score classes it was not trained on."""
    return ConfigError(
        f"method '{method}' scores only the classes it was trained on; train with --method textprior to "
        "add classes from descriptions, attributes or reference images"
    )


class FGVCModel(nn.Module):
    head: nn.Module
    feature_spec: str = "pooled"
    cacheable: bool = False
    has_unused_parameters: bool = False
    #: does the method read the backbone's spatial feature maps (then token backbones are refused)?
    needs_spatial_maps: bool = True
    STAGE_SETTINGS: tuple[str, ...] = ()
    #: set when a checkpoint's pruned channel counts were applied (``finegrain.models.pruned``)
    pruned: bool = False
    export_blocker: str | None = None
    #: annotated part groups the method is supervised with (evaluation measures how well it finds them)
    part_groups: dict[str, list[str]] | None = None
    #: how class embeddings are made (``finegrain.models.class_embed.EmbeddingSpec``); None: no class prior
    embedding = None

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        pretrained: bool = True,
        weights: str | Path | None = None,
        freeze_backbone: bool = False,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self._backbone_spec = {"name": backbone, "pretrained": pretrained, "weights": weights}
        if drop_path_rate:  # stochastic depth: residual blocks skipped at random while training (timm's drop_path)
            self._backbone_spec["drop_path_rate"] = drop_path_rate
        self.backbone = create_backbone(num_classes=0, **self._backbone_spec)
        if self.needs_spatial_maps and is_concatenated(self.backbone):
            raise ConfigError(
                f"{type(self).__name__} reads spatial feature maps, and '{backbone}' concatenates pooled features: "
                "use the baseline method with it, or one backbone"
            )
        if self.needs_spatial_maps and is_token_backbone(self.backbone):
            raise ConfigError(
                f"{type(self).__name__} reads spatial feature maps, and '{backbone}' gives tokens: use the "
                "baseline method with it, or a CNN backbone (e.g. tf_efficientnet_lite0)"
            )
        self.preprocess = backbone_preprocess(self.backbone)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> FGVCModel:
        super().train(mode)
        if self.freeze_backbone:  # frozen means frozen BatchNorm statistics too
            for m in [self.backbone, *(m for m in self.modules() if getattr(m, "is_backbone_copy", False))]:
                m.eval()
        return self

    def backbone_copies(self, n: int) -> nn.ModuleList:
        """``n`` more backbones built like ``self.backbone`` and frozen like it, for methods that give each scale
        or part its own encoder; ``train()`` keeps them in eval mode when frozen."""
        copies = nn.ModuleList(create_backbone(num_classes=0, **self._backbone_spec) for _ in range(n))
        copies.is_backbone_copy = True
        if self.freeze_backbone:
            copies.requires_grad_(False)
        return copies

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def split_stages(self, train_stages: int) -> tuple[nn.Module, nn.Module]:
        """(lower, upper) for partial fine-tuning (``--train-stages``): the frozen first stages (image -> map,
        cached) and the trainable rest with the head (map -> logits), sharing this model's modules."""
        raise ConfigError(f"method '{self.method}' computes its own views of each image, so its maps cannot be cached:"
                          " --train-stages is for --method baseline")  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone_features(x))

    # -- training ---------------------------------------------------------------------------------------------

    def compute_loss(self, out, y: torch.Tensor, criterion: Criterion) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) from what the training forward returned; methods whose training forward returns
        more than logits (scales, views, boxes) combine their terms here."""
        return criterion(out.float(), y), out

    def extra_targets(self, part_names: list[str], data: str) -> dict:
        """``ImageDataset`` options for annotations each training image must bring (none by default)."""
        return {}

    def probe_head(self) -> nn.Linear | None:
        """The linear layer the probe (``finegrain.engine.probe``) may fit in closed form on L2-normalised
        ``backbone_features``, after switching the head to normalise its input; None: the head trains by gradient."""
        return None

    def add_classes(self, class_embed: torch.Tensor, prototypes: torch.Tensor | None = None) -> None:
        """Score more classes than were trained: from their class embeddings (``embedding`` says how they are
        made) and/or reference-image features. Only methods built on class side-information can."""
        raise no_class_prior(self.method)

    def class_evidence(self, x: torch.Tensor, labels: list[int], k: int = 5) -> list[list[dict]]:
        """Per image, the named parts of class ``labels[i]``'s description (attributes) that added most to its
        score: ``[{"name", "contribution"}]``; empty for methods without a class prior."""
        return [[] for _ in labels]

    def record_kwargs(self, kwargs: dict) -> dict:
        """The keyword arguments a checkpoint stores to rebuild this model (tensor arguments live in buffers)."""
        return kwargs

    def adapt_weights(self, method: str, state_dict: dict[str, torch.Tensor]) -> bool:
        """Start from the weights of a checkpoint of another ``method``; False: this method cannot."""
        return False

    def configure(self, **settings) -> None:
        """Set method attributes a progressive-training stage names (only those in ``STAGE_SETTINGS``)."""
        for name, value in settings.items():
            if name not in self.STAGE_SETTINGS:
                known = ", ".join(self.STAGE_SETTINGS) or "none"
                raise ConfigError(f"method '{self.method}' has no stage setting '{name}' (it has: {known})")
            setattr(self, name, value)

    # -- explaining -------------------------------------------------------------------------------------------

    def attention_boxes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Regions the method looked at: one (B, 4) tensor (x0, y0, x1, y1 in [0, 1] of the input) per region."""
        return []

    def explain_layer(self) -> nn.Module | None:
        """The layer whose output Grad-CAM weighs; None: the backbone's last spatial activation (any CNN).

        For a ViT it is the last block's first norm: its patch tokens feed the attention through which the class
        token reads them (after the final norm only the class token reaches the head, so gradients there are 0)."""
        if is_token_backbone(self.backbone):
            return self.backbone.blocks[-1].norm1
        return None

    def activation_map(self, output: torch.Tensor) -> torch.Tensor:
        """``explain_layer``'s output as a (B, C, h, w) map: tokens are laid out on the patch grid."""
        if output.dim() == 3:
            tokens = output[:, self.backbone.num_prefix_tokens :]
            side = math.isqrt(tokens.shape[1])  # finegrain's inputs are square
            return tokens.transpose(1, 2).reshape(len(output), -1, side, side)
        return output
