"""finegrain: fine-grained image classification toolkit."""

__version__ = "0.1.0"

from finegrain.models import create_model, list_models  # noqa: E402

__all__ = ["__version__", "create_model", "list_models"]
