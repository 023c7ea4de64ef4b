"""The GWA epoch aggregate keeps each batch's statistics and scores them together later: the
result must be that of scoring and adding every batch on its own, masks and checkpoints
included; and the finiteness flags computed together must be each batch's own."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_gradwatch import GradientWeightAlignment, GWAEarlyStopping, SpectralNorms
from lightning_gradwatch.callbacks import _gwa_aggregate
from lightning_gradwatch.callbacks._gwa_aggregate import FINE_BINS, EpochAggregate
from lightning_gradwatch.metrics import AlignmentMoments
from lightning_gradwatch.probe.stats import ProbeStats, finite_flags, flag_holder


def _stats(
    batch: int, seed: int, names: tuple[str, ...] = ("w",), poison: float = 0.0
) -> ProbeStats:
    g = torch.Generator().manual_seed(seed)
    stats = ProbeStats(batch_size=batch)
    for name in names:
        stats.dot[name] = torch.randn(batch, generator=g)
        stats.sq_norm[name] = torch.rand(batch, generator=g) * 4 + 0.1
        stats.param_sq_norm[name] = torch.rand((), generator=g) * 3 + 0.5
    if poison and batch:
        stats.sq_norm[names[0]][0] = poison
    return stats


def _reference(batches: list[ProbeStats], names: list[str]) -> AlignmentMoments:
    """Each batch scored and added on its own, as before batching."""
    metric = AlignmentMoments(histogram_bins=FINE_BINS)
    for stats in batches:
        metric.update(stats.alignment(names), valid=stats.finite)
    return metric


def test_batched_aggregate_matches_batch_by_batch() -> None:
    # Unequal batch sizes, a NaN and an Inf batch, more batches than one flush holds.
    sizes = [7, 7, 7, 3, 7, 5] * 15
    batches = [
        _stats(b, seed=i, poison=[0.0, float("nan"), float("inf")][i % 7 if i % 7 < 3 else 0])
        for i, b in enumerate(sizes)
    ]
    aggregate = EpochAggregate()
    for stats in batches:
        aggregate.update(stats, ["w"], per_layer=False)
    expected = _reference(batches, ["w"])
    result, _ = aggregate.compute()
    want = expected.compute()
    assert float(result["count"]) == float(want["count"]) < sum(sizes)
    for key in ("mean", "kurtosis", "gwa", "sum_squares"):
        torch.testing.assert_close(result[key], want[key], rtol=1e-9, atol=0)
    assert torch.equal(result["histogram_counts"], want["histogram_counts"])


def test_batched_aggregate_per_layer_matches() -> None:
    names = ["a", "b"]
    batches = [_stats(6, seed=i, names=("a", "b")) for i in range(10)]
    aggregate = EpochAggregate()
    aggregate.add_layers(names)
    for stats in batches:
        aggregate.update(stats, names, per_layer=True)
    result, layers = aggregate.compute()
    torch.testing.assert_close(
        result["mean"], _reference(batches, names).compute()["mean"], rtol=1e-9, atol=0
    )
    for name in names:
        want = _reference(batches, [name]).compute()
        torch.testing.assert_close(layers[name]["kurtosis"], want["kurtosis"], rtol=1e-9, atol=0)


def test_flush_bounds_the_batches_held(monkeypatch) -> None:
    monkeypatch.setattr(_gwa_aggregate, "FLUSH_BATCHES", 4)
    aggregate = EpochAggregate()
    for i in range(10):
        aggregate.update(_stats(3, seed=i), ["w"], per_layer=False)
        assert len(aggregate._pending) < 4
    assert float(aggregate.epoch.count) == 8 * 3  # two flushes so far, two batches held


def test_state_includes_the_batches_held() -> None:
    aggregate = EpochAggregate()
    for i in range(3):
        aggregate.update(_stats(5, seed=i), ["w"], per_layer=False)
    epoch_state, _ = aggregate.state()
    assert float(epoch_state["count"]) == 15
    restored = EpochAggregate()
    restored.load_state(epoch_state, {})
    torch.testing.assert_close(
        restored.compute()[0]["mean"], aggregate.compute()[0]["mean"], rtol=0, atol=0
    )


def test_masked_update_equals_update_of_the_kept_scores() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(50, generator=g, dtype=torch.float64) * 2 - 1
    scores[3] = float("nan")
    valid = torch.rand(50, generator=g) > 0.3
    valid[3] = False
    masked = AlignmentMoments(histogram_bins=40, shift=0.1)
    masked.update(scores, valid=valid)
    kept = AlignmentMoments(histogram_bins=40, shift=0.1)
    kept.update(scores[valid])
    assert float(masked.count) == float(valid.sum())
    torch.testing.assert_close(masked.power_sums, kept.power_sums, rtol=1e-12, atol=1e-15)
    assert torch.equal(masked.histogram_counts, kept.histogram_counts)


def test_finite_flags_are_each_batch_own() -> None:
    batches = [
        _stats(4, seed=0),
        _stats(4, seed=1, poison=float("nan")),
        _stats(4, seed=2, poison=float("inf")),
        _stats(4, seed=3),
        _stats(2, seed=4),  # another length: flagged on its own
        _stats(0, seed=5),  # no statistics
    ]
    with_sums = _stats(4, seed=6, poison=float("nan"))
    with_sums.sum_sq["w"] = torch.ones(3)
    batches.append(flag_holder(with_sums))
    flags = finite_flags(batches)
    fresh = [_stats(4, 0), _stats(4, 1, poison=math.nan), _stats(4, 2, poison=math.inf)]
    fresh += [_stats(4, 3), _stats(2, 4), _stats(0, 5)]
    expected: list[Tensor] = [s.finite for s in fresh] + [with_sums.finite]
    assert (
        flags.tolist()
        == [bool(f) for f in expected]
        == [
            True,
            False,
            False,
            True,
            True,
            True,
            False,
        ]
    )
    assert [bool(s.finite) for s in batches] == flags.tolist()  # cached in each
    assert finite_flags([_stats(0, seed=7), _stats(0, seed=8)]).tolist() == [True, True]


def test_state_key_follows_its_inputs() -> None:
    gwa = GradientWeightAlignment(indices=None)
    first = gwa.state_key
    assert gwa.state_key is first  # cached
    gwa.backward = 1
    assert gwa.state_key != first
    gwa.backward = None
    gwa.indices = "idx"
    assert gwa.state_key != first
    assert GradientWeightAlignment(indices=None).state_key == first


def test_stopping_and_spectral_state_keys_are_cached_and_follow_their_inputs() -> None:
    stopper = GWAEarlyStopping()
    first = stopper.state_key
    assert stopper.state_key is first  # cached: Lightning reads it around every hook call
    stopper.monitor = "gwa_layers/aggregate/head.weight"
    assert stopper.state_key != first
    assert "gwa_layers/aggregate/head.weight" in stopper.state_key

    spectral = SpectralNorms(params=["0.weight"])
    first = spectral.state_key
    assert spectral.state_key is first
    assert spectral.params is not None
    spectral.params.append("2.weight")  # changed in place: the key follows
    assert spectral.state_key == SpectralNorms(params=["0.weight", "2.weight"]).state_key
    spectral.module_types = (torch.nn.Linear,)
    assert spectral.state_key != first
    assert "Linear" in spectral.state_key
