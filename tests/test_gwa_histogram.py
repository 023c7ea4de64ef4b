"""The ``gwa/scores`` histogram: a fine fixed-edge state (summed across ranks exactly), written
over the range the scores fill."""

from __future__ import annotations

import torch

from lightning_gradwatch.callbacks._gwa_aggregate import FINE_BINS, zoomed_histogram
from lightning_gradwatch.metrics import AlignmentMoments


def _state(scores: torch.Tensor) -> torch.Tensor:
    metric = AlignmentMoments(histogram_bins=FINE_BINS)
    metric.update(scores)
    return metric.compute()["histogram_counts"]


def test_two_modes_a_tenth_apart_show_as_two_modes() -> None:
    """Mislabelled samples (about -0.1) against clean ones (about +0.05): over [-1, 1] with
    100 bins they share one or two bins; the written histogram separates them."""
    g = torch.Generator().manual_seed(0)
    clean = 0.05 + 0.005 * torch.randn(900, generator=g, dtype=torch.float64)
    flipped = -0.1 + 0.005 * torch.randn(100, generator=g, dtype=torch.float64)
    scores = torch.cat([clean, flipped])
    edges, counts = zoomed_histogram(_state(scores), bins=60)  # type: ignore[misc]
    assert len(counts) <= 60 and len(edges) == len(counts) + 1
    assert float(counts.sum()) == 1000
    assert float(edges[0]) <= float(scores.min()) < float(edges[0]) + 2 / FINE_BINS
    assert float(edges[-1]) - 2 / FINE_BINS < float(scores.max()) <= float(edges[-1])
    # the counts of each mode, and an empty gap between them
    centres = (edges[1:] + edges[:-1]) / 2
    assert float(counts[centres < -0.025].sum()) == 100
    assert float(counts[centres > -0.025].sum()) == 900
    gap = (centres > -0.07) & (centres < 0.02)
    assert gap.any() and float(counts[gap].sum()) == 0


def test_counts_are_whole_groups_of_fine_bins() -> None:
    """Re-binning never splits a fine bin: the result is the fine counts summed in groups."""
    counts = torch.zeros(FINE_BINS, dtype=torch.float64)
    counts[1000], counts[1003], counts[1130] = 2, 5, 1  # a filled range of 131 fine bins
    edges, coarse = zoomed_histogram(counts, bins=60)  # type: ignore[misc]
    fine_edges = torch.linspace(-1, 1, FINE_BINS + 1, dtype=torch.float64)
    assert float(edges[0]) == float(fine_edges[1000])
    assert float(edges[-1]) == float(fine_edges[1131])
    # groups of ceil(131 / 60) = 3 fine bins, the last one shorter (2 fine bins)
    assert len(coarse) == 44 and coarse.tolist()[:2] == [2.0, 5.0] and float(coarse[-1]) == 1
    assert float(edges[-2]) == float(fine_edges[1129])
    assert zoomed_histogram(torch.zeros(FINE_BINS), bins=60) is None
