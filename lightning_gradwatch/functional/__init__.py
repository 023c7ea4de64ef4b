"""Pure tensor functions: tensors in, tensors out, no Lightning and no hooks."""

from .alignment import (
    KURTOSIS_OFFSET,
    alignment_moments,
    cosine_alignment,
    excess_kurtosis,
    gwa_aggregate,
)
from .noise import (
    coherence,
    eb_criterion,
    gsnr_mean,
    gsnr_per_entry,
    noise_scale,
    trace_covariance,
    true_grad_sq_norm,
)
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
    "alignment_moments",
    "as_matrix",
    "coherence",
    "conv_operator_norm_fft",
    "cosine_alignment",
    "eb_criterion",
    "effective_rank",
    "excess_kurtosis",
    "gradient_spectrum",
    "gsnr_mean",
    "gsnr_per_entry",
    "gwa_aggregate",
    "log_lipschitz_upper_bound",
    "noise_scale",
    "nuclear_norm",
    "power_iteration",
    "stable_rank",
    "trace_covariance",
    "true_grad_sq_norm",
]
