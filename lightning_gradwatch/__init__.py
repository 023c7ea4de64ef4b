"""lightning-gradwatch: per-sample gradient statistics for PyTorch Lightning, from hooks."""

from .callbacks.gradient_snr import EBEarlyStopping, GradientSNR
from .probe import GradientProbe, ParameterUseError, ProbeStats, register_rule

__all__ = [
    "EBEarlyStopping",
    "GradientProbe",
    "GradientSNR",
    "ParameterUseError",
    "ProbeStats",
    "register_rule",
]
__version__ = "0.1.0"
