"""The stopping rules of ``lightning_gradwatch.functional.stopping`` on synthetic GWA curves."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gradwatch.functional.stopping import (
    RULES,
    select_epoch,
    should_stop,
    validate_options,
)

NAN = math.nan


def curve(values: list[float], kurtosis: list[float] | None = None) -> list[dict[str, float]]:
    """History entries whose ``gwa`` and ``mean`` follow ``values``."""
    kurtosis = kurtosis if kurtosis is not None else [0.0] * len(values)
    return [
        {"epoch": float(i), "gwa": v, "mean": v, "kurtosis": k}
        for i, (v, k) in enumerate(zip(values, kurtosis, strict=True))
    ]


def stop_epoch(history: list[dict[str, float]], rule: str, patience: int, **options) -> int | None:
    """Run the online stopper epoch by epoch; the index after which it stops, or None."""
    for t in range(len(history)):
        if should_stop(history[: t + 1], rule, patience, **options):
            return t
    return None


def test_rules_include_the_paper_rules() -> None:
    assert "argmax" in RULES and "max_after_first_min" in RULES


def test_max_after_first_min_never_selects_epoch_0() -> None:
    """The first minimum is followed by a strict rise, so epoch 0 is never the maximum after it
    (the property the benchmark relies on for the default)."""
    for values in ([0.9, 0.1, 0.2], [0.1, 0.2, 0.15], [0.5, 0.5, 0.6, 0.4], [0.3, 0.2, 0.1]):
        assert select_epoch(curve(values), "max_after_first_min") != 0


def test_transient_peak_at_epoch_0() -> None:
    history = curve([0.9, 0.2, 0.3, 0.4, 0.5, 0.45, 0.4, 0.35, 0.3])
    assert select_epoch(history, "argmax") == 0
    assert stop_epoch(history, "argmax", patience=3) == 3  # the failure the issue reports
    assert select_epoch(history, "argmax", warmup=1) == 4
    assert stop_epoch(history, "argmax", patience=3, warmup=1) == 7
    assert select_epoch(history, "max_after_first_min") == 4
    assert stop_epoch(history, "max_after_first_min", patience=3) == 7


def test_early_spike_is_outlasted_by_patience_and_smoothing() -> None:
    history = curve([0.1, 0.2, 0.8, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.62, 0.6, 0.5, 0.4])
    assert stop_epoch(history, "argmax", patience=3) == 5  # stops on the spike
    # Smoothing with alpha=0.7 turns the spike into a bump lower than the later rise.
    assert select_epoch(history, "argmax", smoothing=0.7) >= 10
    assert stop_epoch(history, "argmax", patience=3, smoothing=0.7) is None
    assert select_epoch(history, "argmax", smoothing=0.7) == 11


def test_plateau_min_rel_delta_keeps_the_first_epoch_of_the_plateau() -> None:
    history = curve([0.1, 0.3, 0.5, 0.500, 0.501, 0.502, 0.503, 0.504, 0.505])
    assert select_epoch(history, "argmax") == 8
    assert should_stop(history, "argmax", patience=3) is False
    assert select_epoch(history, "argmax", min_rel_delta=0.02) == 2
    assert stop_epoch(history, "argmax", patience=3, min_rel_delta=0.02) == 5


def test_ties_keep_the_earliest_epoch() -> None:
    assert select_epoch(curve([0.1, 0.5, 0.5, 0.5]), "argmax") == 1


def test_fine_tuning_dip() -> None:
    history = curve([0.6, 0.4, 0.2, 0.3, 0.5, 0.55, 0.5, 0.45])
    assert select_epoch(history, "argmax") == 0
    assert select_epoch(history, "max_after_first_min") == 5
    # The first minimum is unknown until the curve rises after it.
    assert select_epoch(history[:3], "max_after_first_min") is None
    assert select_epoch(history[:4], "max_after_first_min") == 3  # min at 2, max after it
    assert stop_epoch(history, "max_after_first_min", patience=2) == 7


def test_rising_curve_has_its_first_minimum_at_the_start() -> None:
    history = curve([0.1, 0.2, 0.3, 0.25])
    assert select_epoch(history, "max_after_first_min") == 2


def test_nan_epoch_is_never_selected_and_does_not_reset_patience() -> None:
    history = curve([0.1, 0.2, 0.5, NAN, NAN, 0.4])
    for rule in RULES:
        assert select_epoch(history, rule, warmup=1) == 2, rule
        assert should_stop(history, rule, patience=3, warmup=1) is True, rule
        assert should_stop(history[:5], rule, patience=3, warmup=1) is False, rule
    # A NaN does not break the smoothing chain either.
    assert select_epoch(curve([0.1, NAN, 0.3]), "argmax", smoothing=0.5) == 2
    assert select_epoch(curve([NAN, math.inf, NAN]), "argmax") is None
    assert should_stop(curve([NAN] * 10), "argmax", patience=1) is False


def test_warmup_longer_than_history_selects_nothing() -> None:
    history = curve([0.5, 0.4, 0.3])
    for rule in RULES:
        assert select_epoch(history, rule, warmup=3) is None
        assert should_stop(history, rule, patience=1, warmup=3) is False


def test_mean_after_kurtosis_settles() -> None:
    # The kurtosis jumps 0 -> 3.7 at epoch 1 (the aggregate drops), then settles from epoch 3.
    means = [0.10, 0.11, 0.14, 0.18, 0.20, 0.19, 0.17]
    kurts = [0.0, 3.7, 2.0, 1.8, 1.7, 1.9, 2.5]
    history = [
        {"epoch": float(i), "gwa": m / (k + 1.2), "mean": m, "kurtosis": k}
        for i, (m, k) in enumerate(zip(means, kurts, strict=True))
    ]
    assert select_epoch(history, "argmax") == 0
    assert select_epoch(history[:3], "mean_after_kurtosis_settles") is None
    assert select_epoch(history, "mean_after_kurtosis_settles") == 4
    assert select_epoch(history, "mean_after_kurtosis_settles", settle_tol=1.0) == 4
    assert stop_epoch(history, "mean_after_kurtosis_settles", patience=2) == 6
    # gwa = mean / (kurt + 1.2) over epochs 3.. is 0.06, 0.0690, 0.0613, 0.0459: maximum at 4.
    assert select_epoch(history[:3], "gwa_after_kurtosis_settles") is None
    assert select_epoch(history, "gwa_after_kurtosis_settles") == 4


histories = st.lists(st.one_of(st.floats(-1.0, 1.0), st.just(NAN)), min_size=1, max_size=25).map(
    lambda values: curve(values, kurtosis=[abs(v) * 5 for v in values])
)
option_sets = st.sampled_from(
    [
        ("argmax", {}),
        ("argmax", {"warmup": 2, "smoothing": 0.5}),
        ("argmax", {"min_rel_delta": 0.05}),
        ("max_after_first_min", {}),
        ("max_after_first_min", {"smoothing": 0.3, "min_rel_delta": 0.01, "warmup": 1}),
        ("mean_after_kurtosis_settles", {}),
        ("mean_after_kurtosis_settles", {"settle_tol": 0.1, "smoothing": 0.5}),
        ("gwa_after_kurtosis_settles", {"warmup": 1, "min_rel_delta": 0.02}),
    ]
)


@settings(max_examples=200, deadline=None)
@given(history=histories, rule_options=option_sets)
def test_online_validity(history: list[dict[str, float]], rule_options) -> None:
    """The selection at ``t`` depends only on ``history[:t+1]`` and is eligible and finite."""
    rule, options = rule_options
    full = select_epoch(history, rule, **options)
    for t in range(len(history)):
        selected = select_epoch(history[: t + 1], rule, **options)
        extended = history[: t + 1] + curve([0.99] * 3)  # later epochs must not matter at t
        assert select_epoch(extended[: t + 1], rule, **options) == selected
        if selected is not None:
            assert selected <= t
            assert selected >= options.get("warmup", 0)
            assert math.isfinite(history[selected]["gwa"])
    assert full == select_epoch(history[: len(history)], rule, **options)


@pytest.mark.parametrize(
    ("rule", "options", "message"),
    [
        ("best", {}, "Unknown stopping rule 'best'. Use one of argmax"),
        ("argmax", {"patience": 3}, "Unknown option(s) patience"),
        ("argmax", {"settle_tol": 0.1}, "Allowed options: key, min_rel_delta, smoothing, warmup"),
        ("argmax", {"warmup": -1}, "warmup must be a non-negative integer"),
        ("argmax", {"warmup": 1.5}, "warmup must be a non-negative integer"),
        ("argmax", {"smoothing": 1.0}, "smoothing must be a number in [0, 1)"),
        ("argmax", {"min_rel_delta": -0.1}, "min_rel_delta must be a finite number >= 0"),
        ("argmax", {"key": "kurtosis"}, "key must be one of gwa, mean"),
        ("mean_after_kurtosis_settles", {"key": "gwa"}, "Unknown option(s) key"),
        ("mean_after_kurtosis_settles", {"settle_tol": 0}, "settle_tol must be a finite number"),
        ("gwa_after_kurtosis_settles", {"key": "mean"}, "Unknown option(s) key"),
    ],
)
def test_validate_options_refuses_with_a_helpful_message(rule, options, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_options(rule, **options)
    with pytest.raises(ValueError):
        select_epoch(curve([0.1]), rule, **options)


def test_patience_must_be_positive() -> None:
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        should_stop(curve([0.1, 0.2]), "argmax", patience=0)
