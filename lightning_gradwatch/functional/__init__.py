"""Pure tensor functions: tensors in, tensors out, no Lightning and no hooks."""

from .alignment import KURTOSIS_OFFSET, cosine_alignment, excess_kurtosis, gwa_aggregate
from .noise import (
    coherence,
    eb_criterion,
    gsnr_mean,
    gsnr_per_entry,
    noise_scale,
    trace_covariance,
    true_grad_sq_norm,
)

__all__ = [
    "KURTOSIS_OFFSET",
    "coherence",
    "cosine_alignment",
    "eb_criterion",
    "excess_kurtosis",
    "gsnr_mean",
    "gsnr_per_entry",
    "gwa_aggregate",
    "noise_scale",
    "trace_covariance",
    "true_grad_sq_norm",
]
