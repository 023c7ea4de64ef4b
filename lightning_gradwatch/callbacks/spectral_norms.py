"""Kept importable: ``SpectralNorms`` lives in the :mod:`~lightning_gradwatch.callbacks.spectral`
package, one concept per module."""

from .spectral import DEFAULT_MODULE_TYPES, SpectralNorms, TrackedWeight

#: The former name of :class:`TrackedWeight`.
_Tracked = TrackedWeight

__all__ = ["DEFAULT_MODULE_TYPES", "SpectralNorms", "TrackedWeight"]
