"""Epoch aggregate of gradient-weight alignment scores, correct across DDP ranks.

Design: the metric keeps the power sums ``sum y^k`` (k = 0..4) of the shifted scores
``y = x - shift`` in float64, all reduced with ``dist_reduce_fx="sum"``, and converts them to
central moments at ``compute``. Why power sums rather than ``dist_reduce_fx="cat"`` of the
scores themselves:

- the state is five numbers (plus a fixed-size histogram), whatever the dataset size, so the
  end-of-epoch synchronisation is one small all-reduce instead of gathering every score;
- the scores are cosines in ``[-1, 1]``, so every power sum is bounded by the sample count,
  and float64 carries ~16 significant digits. Converting raw sums to the fourth central
  moment loses about ``log10(E[y^4] / m4)`` digits to cancellation: nothing when the shift is
  near the mean, but about 10 digits for scores of spread 0.002 around a mean of 0.8 with no
  shift. So the shift matters: :class:`GradientWeightAlignment` sets it to the previous
  epoch's mean (a synchronised value, identical on every rank, so the states still add up),
  which keeps the cancellation negligible; the tests check ``scipy.stats.kurtosis`` to
  ``rtol=1e-9``.

The histogram over ``[-1, 1]`` (fixed bins, also summed across ranks) feeds the TensorBoard
histogram of the epoch's scores without keeping the scores.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from ..functional.alignment import _moments_compute, _moments_update


class AlignmentMoments(Metric):
    """Count, moments and histogram of per-sample alignment scores in ``[-1, 1]``.

    ``compute()`` returns a dict with ``"count"``, ``"mean"``, ``"kurtosis"`` (biased Fisher
    excess kurtosis, as ``scipy.stats.kurtosis``), ``"gwa"`` (``mean / (kurtosis + 1.2)``) and
    ``"sum_squares"`` (``sum x^2``) and ``"histogram_counts"`` (``(bins,)``), for histogram
    summaries; under DDP all of them are over every rank's scores.
    With no scores, or all scores equal, kurtosis and gwa are NaN.

    Example::

        >>> import torch
        >>> from lightning_gradwatch.metrics import AlignmentMoments
        >>> metric = AlignmentMoments()
        >>> metric.update(torch.tensor([0.1, 0.5, -0.2, 0.9]))
        >>> round(float(metric.compute()["mean"]), 4)
        0.325

    Args:
        histogram_bins: number of equal bins over ``[-1, 1]`` for :meth:`histogram`.
        shift: the reference subtracted before taking powers; any value gives the same
            result up to rounding, a value near the mean gives the least rounding. Must be
            the same on every rank. Change it only when the metric is empty (:meth:`set_shift`).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    count: Tensor
    power_sums: Tensor
    histogram_counts: Tensor

    def __init__(self, histogram_bins: int = 100, shift: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shift = float(shift)
        if histogram_bins < 1:
            raise ValueError(f"histogram_bins must be >= 1, got {histogram_bins}")
        self.histogram_bins = histogram_bins
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        # sum y, sum y^2, sum y^3, sum y^4 with y = x - shift
        self.add_state("power_sums", torch.zeros(4, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "histogram_counts",
            torch.zeros(histogram_bins, dtype=torch.float64),
            dist_reduce_fx="sum",
        )

    def update(self, scores: Tensor, valid: Tensor | None = None) -> None:
        """Add ``(N,)`` scores (any float dtype; accumulated in float64).

        ``valid``: an optional bool tensor, ``()`` (when False the batch adds nothing) or
        ``(N,)`` (the scores where it is False add nothing). It lets a caller leave out
        non-finite batches without reading a flag to the host.
        """
        x = scores.detach().reshape(-1).to(torch.float64)
        if x.numel() == 0:
            return
        if valid is not None and valid.dim() > 0:
            self._update_masked(x, valid.reshape(-1))
            return
        if valid is not None:
            # NaN * 0 is NaN: replace the values before weighting the batch by its flag.
            x = torch.where(valid, x, torch.zeros_like(x))
        count, power_sums = _moments_update(x, self.shift)
        counts = torch.histc(x.clamp(-1.0, 1.0), bins=self.histogram_bins, min=-1.0, max=1.0)
        if valid is None:
            self.count += count
            self.power_sums += power_sums
            self.histogram_counts += counts
            return
        # state += value * weight in one kernel per state (the product by 0 or 1 is exact, so
        # this is the same sum as weighting first).
        weight = valid.to(torch.float64)
        self.count.addcmul_(count, weight)
        self.power_sums.addcmul_(power_sums, weight)
        self.histogram_counts.addcmul_(counts, weight)

    def _update_masked(self, x: Tensor, valid: Tensor) -> None:
        """:meth:`update` with a per-score mask: a left-out score adds 0 to every power sum
        (its shifted value is replaced by 0) and falls outside the histogram (NaN, which
        ``histc`` ignores)."""
        if valid.shape != x.shape:
            raise ValueError(
                f"valid must be () or have one entry per score ({tuple(x.shape)}), got "
                f"{tuple(valid.shape)}"
            )
        y = torch.where(valid, x - self.shift, 0.0)
        self.count += valid.sum(dtype=torch.float64)
        self.power_sums += y.unsqueeze(1).expand(-1, 4).cumprod(1).sum(0)
        kept = torch.where(valid, x.clamp(-1.0, 1.0), float("nan"))
        self.histogram_counts += torch.histc(kept, bins=self.histogram_bins, min=-1.0, max=1.0)

    def compute(self) -> dict[str, Tensor]:
        """``count``, ``mean``, ``kurtosis``, ``gwa``, ``sum_squares`` (float64 scalars) and
        ``histogram_counts``; computed on the device, with no host synchronisation."""
        return {
            "count": self.count,
            **_moments_compute(self.count, self.power_sums, self.shift),
            # synced here (inside compute); histogram() outside compute sees local counts
            "histogram_counts": self.histogram_counts.clone(),
        }

    def set_shift(self, shift: float) -> None:
        """Set the reference subtracted before taking powers (only while empty)."""
        if float(self.count) != 0:
            raise RuntimeError("set_shift() on a non-empty AlignmentMoments: reset() it first")
        self.shift = float(shift)

    def histogram(self) -> tuple[Tensor, Tensor]:
        """``(bin_edges (bins+1,), counts (bins,))`` of this process's scores so far (use
        ``compute()["histogram_counts"]`` for the counts over all ranks)."""
        edges = torch.linspace(-1.0, 1.0, self.histogram_bins + 1, dtype=torch.float64)
        return edges, self.histogram_counts
