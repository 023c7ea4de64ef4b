"""Pure tensor functions: tensors in, tensors out, no Lightning and no hooks."""

from .alignment import KURTOSIS_OFFSET, cosine_alignment, excess_kurtosis, gwa_aggregate
from .spectral import (
    as_matrix,
    conv_operator_norm_fft,
    effective_rank,
    gradient_spectrum,
    log_lipschitz_upper_bound,
    nuclear_norm,
    power_iteration,
    stable_rank,
)

__all__ = [
    "KURTOSIS_OFFSET",
    "as_matrix",
    "conv_operator_norm_fft",
    "cosine_alignment",
    "effective_rank",
    "excess_kurtosis",
    "gradient_spectrum",
    "gwa_aggregate",
    "log_lipschitz_upper_bound",
    "nuclear_norm",
    "power_iteration",
    "stable_rank",
]
