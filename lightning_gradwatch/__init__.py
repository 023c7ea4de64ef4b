"""lightning-gradwatch: per-sample gradient statistics for PyTorch Lightning, from hooks."""

from .callbacks.gradient_snr import EBEarlyStopping, GradientSNR
from .callbacks.gradient_weight_alignment import GradientWeightAlignment
from .callbacks.gwa_early_stopping import GWAEarlyStopping
from .callbacks.gwa_reweighting import GWAReweighting
from .callbacks.spectral import SpectralNorms
from .data import IndexedDataset
from .probe import GradientProbe, ParameterUseError, ProbeStats, register_rule

__all__ = [
    "EBEarlyStopping",
    "GWAEarlyStopping",
    "GWAReweighting",
    "GradientProbe",
    "GradientSNR",
    "GradientWeightAlignment",
    "IndexedDataset",
    "ParameterUseError",
    "ProbeStats",
    "SpectralNorms",
    "register_rule",
]
__version__ = "0.1.0"
