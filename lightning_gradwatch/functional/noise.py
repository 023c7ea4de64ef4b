"""Gradient noise statistics from per-sample sums: GSNR, noise scale, coherence, EB criterion.

Every function takes the sums over the ``B`` samples of a batch (the effective batch of one
optimizer step, across micro-batches and ranks) and returns the quantity that
``docs/gsnr.md`` and ``docs/metrics.md`` define. Notation:

- ``grad_sum`` ``S = sum_i g_i`` (``(D,)``, or any shape: it is flattened),
- ``grad_sq_sum`` ``Q = sum_i g_i**2`` (same shape as ``S``),
- ``sample_sq_norm_sum`` ``N = sum_i |g_i|^2`` (a scalar; equals ``Q.sum()`` in exact arithmetic),
- ``count`` ``B``.

**Zero-variance entries.** An entry whose biased variance ``Q/B - (S/B)**2`` is at most
``zero_variance_rtol * Q/B`` (its mean square) has no resolvable noise: its GSNR is ``0/0``
for a dead unit, or pure rounding error when every sample agrees. With ``eps == 0`` (the
default) such entries are *left out*: their per-entry value is NaN and means are taken over
the remaining entries. With ``eps > 0`` every entry is kept and ``eps`` is added to the
variance, which is Cockpit's ``MeanGSNR`` convention.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

#: Default ``zero_variance_rtol`` in units of the dtype's machine epsilon: variances below
#: this fraction of the mean square are within the cancellation error of ``Q/B - (S/B)**2``.
ZERO_VARIANCE_EPS_FACTOR = 64.0
#: Up to this many 0/1 values, their float32 sum is an exact count.
_EXACT_FLOAT32_COUNT = 2**24


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1)


def default_zero_variance_rtol(dtype: torch.dtype) -> float:
    """``64 * finfo(dtype).eps``: the relative variance below which an entry counts as zero."""
    return ZERO_VARIANCE_EPS_FACTOR * torch.finfo(dtype).eps


def gradient_mean_and_variance(
    grad_sum: Tensor, grad_sq_sum: Tensor, count: int | Tensor
) -> tuple[Tensor, Tensor]:
    """Per-entry mean ``S/B`` and biased variance ``Q/B - (S/B)**2`` over the samples.

    Args:
        grad_sum: ``S``, any shape.
        grad_sq_sum: ``Q``, same shape.
        count: ``B``.

    Returns:
        ``(mean, variance)``, both flattened to ``(D,)``.
    """
    mean = _flat(grad_sum) / count
    variance = _flat(grad_sq_sum) / count - mean.pow(2)
    return mean, variance


def zero_variance_mask(
    grad_sum: Tensor,
    grad_sq_sum: Tensor,
    count: int | Tensor,
    zero_variance_rtol: float | None = None,
) -> Tensor:
    """``(D,)`` bool: entries whose variance is at most ``rtol`` times their mean square.

    ``zero_variance_rtol=None`` uses :func:`default_zero_variance_rtol` of the input dtype.
    Entries with every ``g_ij == 0`` (dead units, unused parameters) are always in the mask.
    """
    if zero_variance_rtol is None:
        zero_variance_rtol = default_zero_variance_rtol(grad_sum.dtype)
    _, variance = gradient_mean_and_variance(grad_sum, grad_sq_sum, count)
    mean_square = _flat(grad_sq_sum) / count
    return variance <= zero_variance_rtol * mean_square


def gsnr_per_entry(
    grad_sum: Tensor,
    grad_sq_sum: Tensor,
    count: int | Tensor,
    eps: float = 0.0,
    zero_variance_rtol: float | None = None,
) -> Tensor:
    """GSNR of every parameter entry, ``r_j = mean_i(g_ij)**2 / var_i(g_ij)`` (Liu et al. 2020).

    ``var`` is the biased variance over the ``B`` samples. With ``eps > 0`` the denominator is
    ``var + eps`` for every entry (Cockpit's ``MeanGSNR``); with ``eps == 0`` zero-variance
    entries (see :func:`zero_variance_mask`) are NaN.

    Returns:
        ``(D,)`` GSNR per entry, in the dtype of ``grad_sum``.
    """
    mean, variance = gradient_mean_and_variance(grad_sum, grad_sq_sum, count)
    if eps > 0:
        return mean.pow(2) / (variance + eps)
    excluded = zero_variance_mask(grad_sum, grad_sq_sum, count, zero_variance_rtol)
    ratio = mean.pow(2) / variance.masked_fill(excluded, 1.0)
    return ratio.masked_fill(excluded, float("nan"))


def gsnr_mean(
    grad_sum: Tensor,
    grad_sq_sum: Tensor,
    count: int | Tensor,
    eps: float = 0.0,
    zero_variance_rtol: float | None = None,
) -> Tensor:
    """``()`` mean GSNR over the entries (NaN when every entry has zero variance).

    The mean is over entries, so a model-wide value weights each layer by its size, like
    Cockpit's ``MeanGSNR`` on the concatenated parameters.
    """
    return gsnr_per_entry(grad_sum, grad_sq_sum, count, eps, zero_variance_rtol).nanmean()


# -- the formulas, each written once --------------------------------------------------------
# The public single-quantity functions below and noise_statistics (what the callback uses)
# both call these, as torchmetrics' functional and modular APIs share _update/_compute helpers.


def _mean_sq_norm(grad_sum: Tensor, count: int | Tensor) -> Tensor:
    """``|gbar|^2`` with ``gbar = S/B``."""
    return (_flat(grad_sum) / count).pow(2).sum()


def _trace_sigma(norm_sum: Tensor, mean_sq_norm: Tensor, count: int | Tensor) -> Tensor:
    """Unbiased ``tr(Sigma) = (N - B |gbar|^2) / (B - 1)``."""
    return (norm_sum - count * mean_sq_norm) / (count - 1)


def _true_grad_sq_norm(mean_sq_norm: Tensor, trace: Tensor, count: int | Tensor) -> Tensor:
    """Unbiased ``|G|^2 = |gbar|^2 - tr(Sigma)/B``."""
    return mean_sq_norm - trace / count


def _coherence(mean_sq_norm: Tensor, norm_sum: Tensor, count: int | Tensor) -> Tensor:
    """``|S|^2 / (B N) = B |gbar|^2 / N``."""
    return count * mean_sq_norm / norm_sum


def _eb(unbiased_ratio_mean: Tensor, count: int | Tensor) -> Tensor:
    """``1 - B * mean_j(gbar_j**2 / s_j**2)`` with the unbiased variance ``s_j**2``."""
    return 1 - count * unbiased_ratio_mean


def _unbiased_from_biased_ratio(ratio: Tensor, count: int | Tensor) -> Tensor:
    """``gbar**2 / s**2`` from the biased ``gbar**2 / var``: ``s**2 = var * B / (B - 1)``."""
    return ratio * ((count - 1) / count)


def trace_covariance(grad_sum: Tensor, sample_sq_norm_sum: Tensor, count: int | Tensor) -> Tensor:
    """``()`` unbiased ``tr(Sigma) = (N - B |gbar|^2) / (B - 1)`` with ``gbar = S/B``.

    Needs ``B >= 2``.
    """
    return _trace_sigma(sample_sq_norm_sum, _mean_sq_norm(grad_sum, count), count)


def true_grad_sq_norm(grad_sum: Tensor, sample_sq_norm_sum: Tensor, count: int | Tensor) -> Tensor:
    """``()`` unbiased estimate of ``|G|^2``: ``|gbar|^2 - tr(Sigma)/B``. Can be negative."""
    mean_sq_norm = _mean_sq_norm(grad_sum, count)
    trace = _trace_sigma(sample_sq_norm_sum, mean_sq_norm, count)
    return _true_grad_sq_norm(mean_sq_norm, trace, count)


def noise_scale(grad_sum: Tensor, sample_sq_norm_sum: Tensor, count: int | Tensor) -> Tensor:
    """``()`` simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al.).

    Both numerator and denominator are the unbiased single-batch estimates of
    :func:`trace_covariance` and :func:`true_grad_sq_norm`; the ratio is negative (or
    infinite) on steps where the ``|G|^2`` estimate is not positive, i.e. when the batch
    gradient is dominated by noise.
    """
    mean_sq_norm = _mean_sq_norm(grad_sum, count)
    trace = _trace_sigma(sample_sq_norm_sum, mean_sq_norm, count)
    return trace / _true_grad_sq_norm(mean_sq_norm, trace, count)


def coherence(grad_sum: Tensor, sample_sq_norm_sum: Tensor, count: int | Tensor) -> Tensor:
    """``()`` coherence ``alpha = |sum_i g_i|^2 / (B sum_i |g_i|^2)`` in ``[0, 1]``.

    Chatterjee & Zielinski; ``B * alpha`` is the m-coherence. NaN when every ``g_i`` is zero.
    """
    return _coherence(_mean_sq_norm(grad_sum, count), sample_sq_norm_sum, count)


def eb_criterion(
    grad_sum: Tensor,
    grad_sq_sum: Tensor,
    count: int | Tensor,
    eps: float = 0.0,
    zero_variance_rtol: float | None = None,
) -> Tensor:
    """``()`` EB criterion ``1 - (B/D) sum_j gbar_j**2 / s_j**2`` (Mahsereci et al. 2017).

    ``s_j**2 = (Q_j - B gbar_j**2) / (B - 1)`` is the unbiased per-sample variance. With
    ``eps == 0`` zero-variance entries are left out and ``D`` counts the remaining entries;
    with ``eps > 0`` every entry uses ``s_j**2 + eps``. Above 0 means the batch gradient is
    indistinguishable from noise (stop). Needs ``B >= 2``.
    """
    if eps > 0:
        mean, variance = gradient_mean_and_variance(grad_sum, grad_sq_sum, count)
        ratio = mean.pow(2) / (variance * (count / (count - 1)) + eps)
        return _eb(ratio.mean(), count)
    biased = gsnr_mean(grad_sum, grad_sq_sum, count, 0.0, zero_variance_rtol)
    return _eb(_unbiased_from_biased_ratio(biased, count), count)


def noise_statistics(
    grad_sum: Tensor,
    grad_sq_sum: Tensor,
    sample_sq_norm_sum: Tensor,
    count: int | Tensor,
    layer_sizes: list[int],
    eps: float = 0.0,
    zero_variance_rtol: float | None = None,
    *,
    complete: Tensor | None = None,
    workspace: list[Any] | None = None,
    consume: bool = False,
) -> dict[str, Tensor]:
    """Every quantity at once, in a few passes over the ``(D,)`` sums (what the callback uses).

    Equal to the single-quantity functions above (tests check both against the definitions),
    but shares the per-entry work: mean, variance, zero-variance mask and GSNR are formed once,
    and the EB criterion uses ``gbar_j**2 / s_j**2 = (B-1)/B * r_j`` when ``eps == 0``.

    Args:
        grad_sum: ``(D,)`` ``S``, the parameters' entries concatenated layer by layer.
        grad_sq_sum: ``(D,)`` ``Q``.
        sample_sq_norm_sum: ``(L,)`` per layer ``sum_i |g_i|^2``.
        count: ``B >= 2``.
        layer_sizes: the ``L`` layer sizes, summing to ``D``.
        complete: optional ``(L,)`` bool; a layer marked False is left out exactly as if its
            entries of ``S`` and ``Q`` and its ``N`` were zero (every entry zero-variance, no
            share of ``N`` or ``|gbar|^2``), without a ``(D,)`` pass to zero them.
        workspace: optional list that keeps the scratch tensors between calls (empty on the
            first call; its contents are this function's), so a caller computing every step
            does not allocate them anew.
        consume: with ``eps == 0``, ``grad_sum`` and ``grad_sq_sum`` may be overwritten
            (``grad_sq_sum`` serves as a scratch tensor; treat both as meaningless
            afterwards). Fewer ``(D,)`` tensors in flight: each pass then touches less memory.

    Returns:
        ``()`` tensors: ``gsnr_mean``, ``noise_scale``, ``trace_sigma``, ``grad_sq_norm``,
        ``coherence``, ``eb_criterion``; ``(L,)`` tensors ``layer_gsnr`` (NaN for a layer
        with every entry left out) and ``layer_coherence``.
    """
    if zero_variance_rtol is None:
        zero_variance_rtol = default_zero_variance_rtol(grad_sum.dtype)
    if complete is not None:
        zero = torch.zeros((), dtype=grad_sum.dtype, device=grad_sum.device)
        if eps > 0:
            # Every entry counts in the eps > 0 means, so the left-out layers are zeroed.
            # output_size: no device-to-host read of the total on an accelerator.
            keep = torch.repeat_interleave(
                complete,
                torch.tensor(layer_sizes, device=complete.device),
                output_size=sum(layer_sizes),
            )
            grad_sum = torch.where(keep, grad_sum, zero)
            grad_sq_sum = torch.where(keep, grad_sq_sum, zero)
        sample_sq_norm_sum = torch.where(complete, sample_sq_norm_sum, zero)
    if eps > 0:
        mean = grad_sum / count
        mean_sq = mean * mean
        variance = grad_sq_sum / count
        variance -= mean_sq
        ratio = mean_sq / (variance + eps)
        unbiased = variance.mul_(count / (count - 1)).add_(eps)
        eb_ratio_mean = (mean_sq / unbiased).mean()
        included = torch.tensor(layer_sizes, dtype=grad_sum.dtype, device=grad_sum.device)
    else:
        # The same arithmetic as gsnr_per_entry, in place in (D,) scratch rows: at this size
        # every fresh allocation and every extra pass costs about as much as the arithmetic
        # itself. The zero-variance mask is a float 0/1 row: on a CPU, bool masks
        # (masked_fill_, summing a bool) cost ten times a float pass. The three rows summed
        # per layer (mean square, ratio, mask) are one (3, D) block, so that each layer's
        # three sums are one reduction: a kernel per layer rather than four (with many
        # layers, the small kernels cost more than the passes over the entries).
        #
        # The rows hold B**2 times the per-entry quantities (``S**2`` and ``B*Q - S**2``
        # rather than ``(S/B)**2`` and ``Q/B - (S/B)**2``): the ratio and the zero-variance
        # test are the same, and the factor comes out of the per-layer sums, which saves a
        # pass over the entries.
        block, sizes = _scratch(workspace, grad_sum, 3 if consume else 4, layer_sizes)
        mean_sq, ratio, excluded = block[0], block[1], block[2]
        variance = grad_sq_sum if consume else block[3]  # consume: in place in the sums
        torch.mul(grad_sum, grad_sum, out=mean_sq)
        torch.mul(grad_sq_sum, count, out=variance)
        torch.mul(variance, zero_variance_rtol, out=ratio)  # the threshold, for now
        variance -= mean_sq
        torch.le(variance, ratio, out=excluded)  # 1.0 where left out
        # Kept entries divide by their variance (> threshold >= 0) exactly; left-out ones by
        # max(variance, threshold) + 1 >= 1, a finite quotient that the next line zeroes.
        torch.maximum(variance, ratio, out=variance).add_(excluded)
        torch.div(mean_sq, variance, out=ratio)
        torch.addcmul(ratio, ratio, excluded, value=-1.0, out=ratio)
        starts = itertools.accumulate(layer_sizes[:-1], initial=0)
        spans = zip(starts, layer_sizes, strict=True)
        per_layer = torch.stack([block[:3, start : start + n].sum(1) for start, n in spans])
        layer_mean_sq_b2, layer_ratio_sum, left_out = per_layer.unbind(1)
        layer_mean_sq = layer_mean_sq_b2 / (count * count)
        if max(layer_sizes) > _EXACT_FLOAT32_COUNT and grad_sum.dtype != torch.float64:
            # A sum of 0/1 values is an exact count in float32 up to 2**24 entries only.
            left_out = torch.stack(
                [part.double().sum() for part in excluded.split(layer_sizes)]
            ).to(grad_sum.dtype)
        included = sizes - left_out
    if eps > 0:
        layer_ratio_sum = torch.stack([part.sum() for part in ratio.split(layer_sizes)])
        layer_mean_sq = torch.stack([part.sum() for part in mean_sq.split(layer_sizes)])
    if complete is not None and eps == 0:
        # A left-out layer: every entry excluded, nothing summed.
        zero = torch.zeros((), dtype=grad_sum.dtype, device=grad_sum.device)
        included = torch.where(complete, included, zero)
        layer_ratio_sum = torch.where(complete, layer_ratio_sum, zero)
        layer_mean_sq = torch.where(complete, layer_mean_sq, zero)
    gsnr = layer_ratio_sum.sum() / included.sum()
    if eps == 0:
        eb_ratio_mean = _unbiased_from_biased_ratio(gsnr, count)
    norm_sum = sample_sq_norm_sum.sum()
    mean_sq_norm = layer_mean_sq.sum()
    trace = _trace_sigma(norm_sum, mean_sq_norm, count)
    true_sq = _true_grad_sq_norm(mean_sq_norm, trace, count)
    return {
        "gsnr_mean": gsnr,
        "noise_scale": trace / true_sq,
        "trace_sigma": trace,
        "grad_sq_norm": true_sq,
        "coherence": _coherence(mean_sq_norm, norm_sum, count),
        "eb_criterion": _eb(eb_ratio_mean, count),
        "layer_gsnr": layer_ratio_sum / included,
        "layer_coherence": _coherence(layer_mean_sq, sample_sq_norm_sum, count),
    }


def _scratch(
    workspace: list[Any] | None, like: Tensor, rows: int, layer_sizes: list[int]
) -> tuple[Tensor, Tensor]:
    """A ``(rows, D)`` scratch block like ``like`` and the layer sizes as a ``(L,)`` tensor
    of its dtype on its device, reused from ``workspace`` when it holds them for the same
    rows, sizes, dtype and device (no allocation, and no host-to-device copy of the sizes,
    per call)."""
    key = (rows, tuple(layer_sizes), like.dtype, like.device)
    if workspace and len(workspace) == 3 and workspace[0] == key:
        return workspace[1], workspace[2]
    block = like.new_empty(rows, like.numel())
    sizes = torch.tensor(layer_sizes, dtype=like.dtype, device=like.device)
    if workspace is not None:
        workspace[:] = [key, block, sizes]
    return block, sizes
