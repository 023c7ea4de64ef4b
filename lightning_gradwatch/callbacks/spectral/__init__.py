"""``SpectralNorms`` and its parts, one concept per module: which weights are tracked
(``selection``), the warm-started power iteration (``power``), gradient spectra
(``gradient_svd``), the growth alarm (``growth``), the heatmap history (``history``) and the
callback that schedules and logs them (``callback``)."""

from .callback import EXACT_INTERVAL_STEPS, MAX_EXACT_INTERVAL_STEPS, SpectralNorms
from .selection import DEFAULT_MODULE_TYPES, TrackedWeight

__all__ = [
    "DEFAULT_MODULE_TYPES",
    "EXACT_INTERVAL_STEPS",
    "MAX_EXACT_INTERVAL_STEPS",
    "SpectralNorms",
    "TrackedWeight",
]
