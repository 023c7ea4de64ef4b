"""Pure tensor functions: tensors in, tensors out, no Lightning and no hooks."""

from .alignment import KURTOSIS_OFFSET, cosine_alignment, excess_kurtosis, gwa_aggregate

__all__ = ["KURTOSIS_OFFSET", "cosine_alignment", "excess_kurtosis", "gwa_aggregate"]
