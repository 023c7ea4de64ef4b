"""Per-layer rules. Importing this package registers every rule."""

from . import attention, conv, embedding, embedding_bag, linear, norm, recurrent
from .fallback import FallbackRule

__all__ = [
    "FallbackRule",
    "attention",
    "conv",
    "embedding",
    "embedding_bag",
    "linear",
    "norm",
    "recurrent",
]
