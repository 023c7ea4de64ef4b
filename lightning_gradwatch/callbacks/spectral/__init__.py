"""``SpectralNorms`` and its parts, one concept per module: which weights are tracked
(``selection``), the warm-started power iteration (``power``), gradient spectra
(``gradient_svd``), the growth alarm (``growth``), the heatmap history (``history``) and the
callback that schedules and logs them (``callback``)."""

from .callback import MAX_EXACT_INTERVAL_EPOCHS, SpectralNorms
from .selection import DEFAULT_MODULE_TYPES, TrackedWeight

__all__ = ["DEFAULT_MODULE_TYPES", "MAX_EXACT_INTERVAL_EPOCHS", "SpectralNorms", "TrackedWeight"]
