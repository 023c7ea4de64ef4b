"""Gradient-weight alignment (Hoelzl, Rueckert, Kaissis, NeurIPS 2025): pure tensor functions."""

from __future__ import annotations

import torch
from torch import Tensor

#: Excess kurtosis of a uniform distribution is -1.2; the offset keeps the denominator positive.
KURTOSIS_OFFSET = 1.2


def cosine_alignment(dot: Tensor, grad_sq_norm: Tensor, weight_sq_norm: Tensor) -> Tensor:
    """Per-sample ``cos(-g_i, w) = -<g_i, w> / (|g_i| |w|)``.

    Args:
        dot: ``(B,)`` inner products ``<g_i, w>``.
        grad_sq_norm: ``(B,)`` squared gradient norms ``|g_i|^2``.
        weight_sq_norm: ``()`` squared weight norm ``|w|^2``.

    Returns:
        ``(B,)`` scores in ``[-1, 1]``. A sample with an exactly zero gradient (or zero
        weights) scores 0: it pulls in no direction.
    """
    denom = (grad_sq_norm.clamp_min(0) * weight_sq_norm.clamp_min(0)).sqrt()
    score = -dot / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    return torch.where(denom > 0, score, torch.zeros_like(score)).clamp(-1.0, 1.0)


def excess_kurtosis(scores: Tensor) -> Tensor:
    """Biased (Fisher) excess kurtosis ``m4 / m2**2 - 3``, as ``scipy.stats.kurtosis``.

    Args:
        scores: ``(N,)``.

    Returns:
        ``()``; NaN if all scores are equal.
    """
    centred = scores - scores.mean()
    m2 = centred.pow(2).mean()
    m4 = centred.pow(4).mean()
    return m4 / m2.pow(2) - 3.0


def gwa_aggregate(mean: Tensor, kurtosis: Tensor) -> Tensor:
    """The paper's dataset-level score ``mean / (excess_kurtosis + 1.2)``."""
    return mean / (kurtosis + KURTOSIS_OFFSET)
