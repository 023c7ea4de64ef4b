"""Per-layer rules. Importing this package registers every rule."""

from . import attention, conv, embedding, linear, norm
from .fallback import FallbackRule

__all__ = ["FallbackRule", "attention", "conv", "embedding", "linear", "norm"]
