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
    # A product that is negative (a squared norm rounded below zero) or NaN has a NaN root,
    # which fails `denom > 0` like a zero denominator: the sample scores 0, as if both factors
    # were clamped to 0 first. Few kernels: this runs on every scored batch.
    denom = (grad_sq_norm.clamp_min(0) * weight_sq_norm).sqrt_()
    score = torch.div(dot, denom).neg_()
    return torch.where(denom > 0, score, 0.0).clamp_(-1.0, 1.0)


def _moments_update(scores: Tensor, shift: float | Tensor = 0.0) -> tuple[Tensor, Tensor]:
    """Sufficient statistics of a set of scores: their count and the power sums
    ``sum y^k`` (k = 1..4) of ``y = x - shift``, in float64. They add up across batches and
    ranks, which is what :class:`~lightning_gradwatch.metrics.AlignmentMoments` keeps.

    Args:
        scores: ``(N,)`` (any float dtype).
        shift: the reference subtracted before taking powers (a value near the mean keeps
            the later conversion to central moments free of cancellation).

    Returns:
        ``count ()`` and ``power_sums (4,)``, float64.
    """
    y = scores.detach().reshape(-1).to(torch.float64) - shift
    # (N, 4) powers y^1..y^4 by cumulative product, summed in one reduction
    powers = y.unsqueeze(1).expand(-1, 4).cumprod(1)
    count = torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device)
    return count, powers.sum(0)


def _moments_compute(
    count: Tensor, power_sums: Tensor, shift: float | Tensor = 0.0
) -> dict[str, Tensor]:
    """Mean, biased (Fisher) excess kurtosis, the GWA aggregate and ``sum x^2`` from the
    statistics of :func:`_moments_update`. No host synchronisation.

    Args:
        count: ``()`` number of scores.
        power_sums: ``(4,)`` ``sum (x - shift)^k``, k = 1..4.

    Returns:
        float64 ``()`` tensors ``mean``, ``kurtosis``, ``gwa``, ``sum_squares``; ``mean`` and
        ``sum_squares`` are NaN with no scores, ``kurtosis`` and ``gwa`` also when all scores
        are equal.
    """
    n = count.to(torch.float64)
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    s1, s2, s3, s4 = power_sums.to(torch.float64) / safe_n  # raw moments E[y^k]
    nan = torch.full_like(n, float("nan"))
    mean = torch.where(n > 0, s1 + shift, nan)
    m2 = (s2 - s1**2).clamp_min(0.0)  # central moments are shift-invariant
    m4 = s4 - 4 * s1 * s3 + 6 * s1**2 * s2 - 3 * s1**4
    kurtosis = torch.where(
        (n > 0) & (m2 > 0), m4 / m2.clamp_min(torch.finfo(m2.dtype).tiny) ** 2 - 3.0, nan
    )
    sum_squares = power_sums[1] + 2 * shift * power_sums[0] + n * shift**2
    return {
        "mean": mean,
        "kurtosis": kurtosis,
        "gwa": gwa_aggregate(mean, kurtosis),
        "sum_squares": torch.where(n > 0, sum_squares, nan),
    }


def alignment_moments(scores: Tensor) -> dict[str, Tensor]:
    """Mean, biased excess kurtosis and the GWA aggregate of a set of scores.

    The functional form of :class:`~lightning_gradwatch.metrics.AlignmentMoments`: the same
    two helpers, with the shift at the scores' own mean.

    Args:
        scores: ``(N,)``.

    Returns:
        float64 ``()`` tensors ``mean``, ``kurtosis``, ``gwa``, ``sum_squares``.

    >>> m = alignment_moments(torch.tensor([0.1, 0.5, -0.2, 0.9]))
    >>> round(float(m["mean"]), 4), round(float(m["kurtosis"]), 4)
    (0.325, -1.4024)
    """
    shift = scores.detach().to(torch.float64).mean() if scores.numel() else 0.0
    return _moments_compute(*_moments_update(scores, shift), shift)


def excess_kurtosis(scores: Tensor) -> Tensor:
    """Biased (Fisher) excess kurtosis ``m4 / m2**2 - 3``, as ``scipy.stats.kurtosis``.

    Args:
        scores: ``(N,)``.

    Returns:
        ``()`` float64; NaN if all scores are equal.
    """
    return alignment_moments(scores)["kurtosis"]


def gwa_aggregate(mean: Tensor, kurtosis: Tensor) -> Tensor:
    """The paper's dataset-level score ``mean / (excess_kurtosis + 1.2)``."""
    return mean / (kurtosis + KURTOSIS_OFFSET)
