"""lightning-gradwatch: per-sample gradient statistics for PyTorch Lightning, from hooks."""

from .callbacks.spectral_norms import SpectralNorms
from .probe import GradientProbe, ParameterUseError, ProbeStats, register_rule

__all__ = ["GradientProbe", "ParameterUseError", "ProbeStats", "SpectralNorms", "register_rule"]
__version__ = "0.1.0"
