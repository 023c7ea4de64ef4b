"""Epoch-selection and stopping rules over a GWA history: pure functions, no Lightning.

The input is the per-epoch history the :class:`~lightning_gradwatch.GradientWeightAlignment`
callback records: a sequence of mappings, ``history[i]`` being the entry of the ``i``-th
recorded epoch, with at least ``gwa`` (the aggregate ``mean / (excess_kurtosis + 1.2)``),
``mean`` and ``kurtosis``. A value may be NaN (or infinite) for a failed epoch.

Every rule is *online-valid*: ``select_epoch(history[: t + 1], ...)`` uses only epochs
``0..t``, so the choice made at epoch ``t`` is the choice a stopper running at epoch ``t``
can make. A post-hoc rule over a finished run is ``select_epoch(full_history, ...)``.

``max_after_first_min`` with patience 5 is the rule ``benchmarks/early_stopping.py`` chose as the
default stopper (evidence in ``benchmarks/README.md``): it never selects epoch 0, and it matched a
10% validation split on average at 0/20/40% label noise.

Rules (``RULES``)
-----------------
``"argmax"``
    The paper's rule for training from scratch: the epoch with the largest value over the
    run so far. Ties keep the earlier epoch.
``"max_after_first_min"``
    The paper's rule for fine-tuning: the largest value at or after the first local minimum.
    Over the eligible epochs ``e_0 < e_1 < ...`` (see below), the first minimum is the first
    ``e_k`` whose successor is strictly larger, ``v[e_{k+1}] > v[e_k]``; it is known only once
    that successor has been seen, and until then nothing is selected. A curve that rises from
    its first eligible epoch has its first minimum there.
``"mean_after_kurtosis_settles"``
    Separates the two parts of the aggregate: the excess kurtosis of the scores jumps in the
    first epochs (a near-Gaussian start, then a heavy tail) and drives the early transient of
    the aggregate, while the mean alignment moves slowly. The kurtosis has *settled* at the
    first eligible epoch ``e_k`` (``k >= 1``) with
    ``|kurt[e_k] - kurt[e_{k-1}]| <= settle_tol * max(1, |kurt[e_{k-1}]|)``. The rule is the
    running argmax of ``mean`` over the eligible epochs from the settling epoch on; nothing is
    selected before it settles.
``"gwa_after_kurtosis_settles"``
    The same settling epoch, but the running argmax of the aggregate ``gwa`` from it on: the
    warm-up length is read off the kurtosis instead of being fixed.

Options (all rules)
-------------------
``warmup`` (int, default 0)
    Epochs with index ``< warmup`` are never selectable and are ignored entirely (they do not
    seed the smoothing nor the first-minimum or settling searches).
``smoothing`` (float in ``[0, 1)``, default 0)
    Exponential moving average of the value before selecting:
    ``s[e_0] = v[e_0]``, ``s[e_k] = smoothing * s[e_{k-1}] + (1 - smoothing) * v[e_k]``.
    Skipped epochs (NaN, warm-up) do not update it. Pair it with a longer patience: smoothing
    delays the peak by about ``smoothing / (1 - smoothing)`` epochs.
``min_rel_delta`` (float ``>= 0``, default 0)
    A later epoch replaces the current selection only when its (smoothed) value exceeds the
    selected one by more than ``min_rel_delta * |selected value|``; it keeps a slow drift or
    noise on a plateau from pushing the selection (and the patience) forward forever.
``key`` (``"gwa"`` or ``"mean"``, default ``"gwa"``; ``argmax`` and ``max_after_first_min``)
    Which history field to select on.
``settle_tol`` (float ``> 0``, default 0.25; the two ``*_after_kurtosis_settles`` rules)
    The relative kurtosis change under which the kurtosis counts as settled.

Eligible epochs are those with index ``>= warmup`` whose value (and, for the
``*_after_kurtosis_settles`` rules, kurtosis) is finite. Non-finite epochs are never selected,
never update the smoothing and never reset the patience: they count as epochs passed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["RULES", "select_epoch", "should_stop", "validate_options"]

#: Names accepted by :func:`select_epoch` and :func:`should_stop`.
RULES: tuple[str, ...] = (
    "argmax",
    "max_after_first_min",
    "mean_after_kurtosis_settles",
    "gwa_after_kurtosis_settles",
)
_SETTLING_RULES = {"mean_after_kurtosis_settles": "mean", "gwa_after_kurtosis_settles": "gwa"}

_COMMON_DEFAULTS: dict[str, Any] = {"warmup": 0, "smoothing": 0.0, "min_rel_delta": 0.0}
_RULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "argmax": {"key": "gwa"},
    "max_after_first_min": {"key": "gwa"},
    "mean_after_kurtosis_settles": {"settle_tol": 0.25},
    "gwa_after_kurtosis_settles": {"settle_tol": 0.25},
}
_KEYS = ("gwa", "mean")


def _is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_options(rule: str, **options: Any) -> None:
    """Check a rule name and its options; raise ``ValueError`` saying what to change.

    Args:
        rule: one of :data:`RULES`.
        **options: the options described in the module docstring.
    """
    if rule not in RULES:
        raise ValueError(f"Unknown stopping rule {rule!r}. Use one of {', '.join(RULES)}.")
    allowed = {**_COMMON_DEFAULTS, **_RULE_DEFAULTS[rule]}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {', '.join(unknown)} for stopping rule {rule!r}. "
            f"Allowed options: {', '.join(sorted(allowed))}."
        )
    warmup = options.get("warmup", 0)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(
            f"warmup must be a non-negative integer number of epochs, got {warmup!r}. "
            "Use 0 for no warm-up."
        )
    smoothing = options.get("smoothing", 0.0)
    if not _is_real_number(smoothing) or not 0.0 <= smoothing < 1.0:
        raise ValueError(
            f"smoothing must be a number in [0, 1) (the EMA weight of the past), got "
            f"{smoothing!r}. Use 0 for no smoothing."
        )
    min_rel_delta = options.get("min_rel_delta", 0.0)
    if not _is_real_number(min_rel_delta) or not math.isfinite(min_rel_delta) or min_rel_delta < 0:
        raise ValueError(
            f"min_rel_delta must be a finite number >= 0 (a relative improvement, e.g. 0.01), "
            f"got {min_rel_delta!r}."
        )
    if "key" in options and options["key"] not in _KEYS:
        raise ValueError(
            f"key must be one of {', '.join(_KEYS)} (the history field to select on), "
            f"got {options['key']!r}."
        )
    if "settle_tol" in options:
        settle_tol = options["settle_tol"]
        if not _is_real_number(settle_tol) or not math.isfinite(settle_tol) or settle_tol <= 0:
            raise ValueError(
                f"settle_tol must be a finite number > 0 (a relative kurtosis change, e.g. "
                f"0.25), got {settle_tol!r}."
            )


def _finite(entry: Mapping[str, float], key: str) -> float | None:
    value = entry.get(key, math.nan)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _eligible(
    history: Sequence[Mapping[str, float]], key: str, warmup: int, needs_kurtosis: bool
) -> list[tuple[int, float]]:
    """``(index, value)`` of the epochs that may be selected, in order."""
    eligible = []
    for index in range(warmup, len(history)):
        value = _finite(history[index], key)
        if value is None:
            continue
        if needs_kurtosis and _finite(history[index], "kurtosis") is None:
            continue
        eligible.append((index, value))
    return eligible


def _smoothed(points: list[tuple[int, float]], smoothing: float) -> list[tuple[int, float]]:
    if smoothing == 0.0 or not points:
        return points
    out = []
    state = points[0][1]
    for index, value in points:
        state = smoothing * state + (1.0 - smoothing) * value
        out.append((index, state))
    return out


def _running_argmax(points: list[tuple[int, float]], min_rel_delta: float) -> int | None:
    best_index: int | None = None
    best_value = -math.inf
    for index, value in points:
        if best_index is None or value > best_value + min_rel_delta * abs(best_value):
            best_index, best_value = index, value
    return best_index


def select_epoch(history: Sequence[Mapping[str, float]], rule: str, **options: Any) -> int | None:
    """The epoch the rule selects, using only ``history[0..t]`` with ``t = len(history) - 1``.

    Args:
        history: per-epoch entries with ``gwa``, ``mean``, ``kurtosis`` (NaN for a failed epoch).
        rule: one of :data:`RULES`.
        **options: see the module docstring (``warmup``, ``smoothing``, ``min_rel_delta``, ...).

    Returns:
        Index into ``history`` of the selected epoch, or ``None`` when no epoch is eligible yet
        (warm-up, all non-finite, first minimum or kurtosis settling not yet seen).
    """
    validate_options(rule, **options)
    opts = {**_COMMON_DEFAULTS, **_RULE_DEFAULTS[rule], **options}
    warmup: int = opts["warmup"]
    if rule in _SETTLING_RULES:
        points = _eligible(history, _SETTLING_RULES[rule], warmup, needs_kurtosis=True)
        settled_at = None
        for k in range(1, len(points)):
            previous = float(history[points[k - 1][0]]["kurtosis"])
            current = float(history[points[k][0]]["kurtosis"])
            if abs(current - previous) <= opts["settle_tol"] * max(1.0, abs(previous)):
                settled_at = k
                break
        if settled_at is None:
            return None
        points = _smoothed(points[settled_at:], opts["smoothing"])
        return _running_argmax(points, opts["min_rel_delta"])

    points = _smoothed(
        _eligible(history, opts["key"], warmup, needs_kurtosis=False), opts["smoothing"]
    )
    if rule == "argmax":
        return _running_argmax(points, opts["min_rel_delta"])
    # max_after_first_min
    first_min = next((k for k in range(len(points) - 1) if points[k + 1][1] > points[k][1]), None)
    if first_min is None:
        return None
    return _running_argmax(points[first_min:], opts["min_rel_delta"])


def should_stop(
    history: Sequence[Mapping[str, float]], rule: str, patience: int, **options: Any
) -> bool:
    """Whether the online stopper stops after the last epoch of ``history``.

    It stops when an epoch is selected and at least ``patience`` epochs (non-finite ones
    included) have been recorded after it: ``len(history) - 1 - selected >= patience``.
    The weights to restore are those of ``select_epoch(history, rule, **options)``.

    Args:
        history: per-epoch entries, as for :func:`select_epoch`.
        rule: one of :data:`RULES`.
        patience: epochs (``>= 1``) to wait after the selected epoch.
        **options: as for :func:`select_epoch`.
    """
    if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
        raise ValueError(
            f"patience must be an integer >= 1 (epochs to wait after the selected epoch), "
            f"got {patience!r}."
        )
    selected = select_epoch(history, rule, **options)
    if selected is None:
        return False
    return len(history) - 1 - selected >= patience
