"""Backbones and FGVC methods behind one registry (``create_model``)."""

from finegrain.models import baseline as _baseline  # noqa: F401 - registers "baseline"
from finegrain.models import bcnn as _bcnn  # noqa: F401 - registers "bcnn", "cbcnn"
from finegrain.models import parts as _parts  # noqa: F401 - registers "parts"
from finegrain.models import racnn as _racnn  # noqa: F401 - registers "racnn"
from finegrain.models import textprior as _textprior  # noqa: F401 - registers "textprior"
from finegrain.models import wsdan as _wsdan  # noqa: F401 - registers "wsdan"
from finegrain.models.backbone import create_backbone, map_efficientnet_pytorch_keys
from finegrain.models.registry import create_model, list_models, needs_class_info, register_model

__all__ = [
    "create_backbone",
    "create_model",
    "list_models",
    "map_efficientnet_pytorch_keys",
    "needs_class_info",
    "register_model",
]
