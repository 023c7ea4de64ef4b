"""AlignmentMoments against scipy, and its rank-merge (sum of states) against the union."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from lightning_gradwatch.data import IndexedDataset, batch_indices
from lightning_gradwatch.functional import excess_kurtosis, gwa_aggregate
from lightning_gradwatch.metrics import AlignmentMoments

scores_strategy = st.lists(
    st.floats(min_value=-1.0, max_value=1.0, allow_nan=False), min_size=2, max_size=300
).filter(lambda xs: np.ptp(xs) > 1e-3)


@settings(max_examples=40, deadline=None)
@given(
    scores=scores_strategy,
    split=st.integers(min_value=0, max_value=300),
    shift=st.floats(min_value=-1.0, max_value=1.0),
)
def test_moments_match_scipy_in_any_batching(scores: list[float], split: int, shift: float) -> None:
    x = torch.tensor(scores, dtype=torch.float64)
    metric = AlignmentMoments(shift=shift)
    metric.update(x[:split])
    metric.update(x[split:])
    result = metric.compute()
    kurt = stats.kurtosis(x.numpy())  # Fisher, biased: the paper's estimator
    # Stated bound: the conversion from power sums loses a factor E[(x-shift)^4] / m4 of
    # float64's precision (see the module docstring); below 1e4 the result is good to 1e-9.
    centred = x - x.mean()
    cancellation = float((x - shift).pow(4).mean() / centred.pow(4).mean())
    rel = 1e-9 + 1e-13 * cancellation
    assert result["count"] == len(scores)
    assert float(result["mean"]) == pytest.approx(float(x.mean()), rel=1e-12, abs=1e-12)
    assert float(result["kurtosis"]) == pytest.approx(kurt, rel=rel, abs=rel)
    expected = float(x.mean()) / (kurt + 1.2)
    assert float(result["gwa"]) == pytest.approx(expected, rel=rel, abs=rel)
    # the functional path agrees too
    assert float(gwa_aggregate(x.mean(), excess_kurtosis(x))) == pytest.approx(expected, rel=1e-9)


def test_concentrated_scores_keep_precision() -> None:
    # Narrow spread around a large mean: the worst case for power sums.
    rng = np.random.default_rng(0)
    x = 0.8 + 0.002 * rng.standard_normal(20000)
    x32 = torch.tensor(x, dtype=torch.float32)
    expected = stats.kurtosis(x32.double().numpy())
    # shifted by roughly the mean (what the callback does with the previous epoch's mean)
    metric = AlignmentMoments(shift=0.79)
    metric.update(x32)
    assert float(metric.compute()["kurtosis"]) == pytest.approx(expected, rel=1e-9)
    assert float(metric.compute()["mean"]) == pytest.approx(float(x32.double().mean()), rel=1e-12)
    # without a shift the cancellation costs ~10 of float64's 16 digits: still ~1e-2 accurate
    unshifted = AlignmentMoments()
    unshifted.update(x32)
    assert float(unshifted.compute()["kurtosis"]) == pytest.approx(expected, rel=1e-1, abs=0.05)


def test_summed_states_equal_the_union() -> None:
    # What dist_reduce_fx="sum" does across ranks.
    rng = np.random.default_rng(1)
    parts = [rng.uniform(-1, 1, n) for n in (37, 64, 5)]
    metrics = []
    for part in parts:
        m = AlignmentMoments(histogram_bins=10, shift=0.25)
        m.update(torch.tensor(part))
        metrics.append(m)
    merged = AlignmentMoments(histogram_bins=10, shift=0.25)
    for key in ("count", "power_sums", "histogram_counts"):
        setattr(merged, key, sum(getattr(m, key) for m in metrics))
    merged._update_count = 1
    union = np.concatenate(parts)
    result = merged.compute()
    assert float(result["gwa"]) == pytest.approx(union.mean() / (stats.kurtosis(union) + 1.2))
    assert float(result["sum_squares"]) == pytest.approx(float((union**2).sum()))
    edges, counts = merged.histogram()
    np.testing.assert_array_equal(counts.numpy(), np.histogram(union, bins=edges.numpy())[0])


def test_empty_and_constant_are_nan() -> None:
    metric = AlignmentMoments()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(metric.compute()["gwa"]))
    metric.reset()
    metric.update(torch.full((5,), 0.3))
    assert math.isnan(float(metric.compute()["kurtosis"]))


def test_indexed_dataset_and_batch_convention() -> None:
    base = torch.utils.data.TensorDataset(torch.randn(6, 3), torch.arange(6))
    tuples = IndexedDataset(base)
    assert tuples[4][2] == 4 and len(tuples) == 6
    batch = next(iter(torch.utils.data.DataLoader(tuples, batch_size=3, shuffle=False)))
    assert batch_indices(batch, -1, 3).tolist() == [0, 1, 2]
    dicts = IndexedDataset([{"x": torch.zeros(2)} for _ in range(4)])
    batch = next(iter(torch.utils.data.DataLoader(dicts, batch_size=4)))
    assert batch_indices(batch, "index", 4).tolist() == [0, 1, 2, 3]
    assert batch_indices(batch, lambda b: b["index"] * 2, 4).tolist() == [0, 2, 4, 6]
    assert batch_indices((torch.zeros(4),), "index", 4) is None
    with pytest.raises(ValueError, match="one per sample"):
        batch_indices(batch, "x", 4)
