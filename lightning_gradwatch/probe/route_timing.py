"""Choosing between exact routes of a rule by timing them on the first steps.

Which route is fastest for a layer depends on its shape and on the machine (the matrix
kernels' speed for thin or wide products, how fast a strided copy runs), and a cost model
calibrated on one CPU misjudges another. Every route gives the same statistics up to
rounding, so a rule may run each candidate a few times for a layer and shape, then keep the
fastest: after one untimed call (lazy initialisation, first allocations), the next
``len(routes) * trials`` calls pay for the slower routes, the rest run the fastest.

Only CPU work is timed: on an accelerator the time until a kernel is queued says nothing of
its cost, and waiting for it would synchronise the host, so there the first route is used.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class _Trials:
    """Best time seen per route, and how many times each was run."""

    best: dict[str, float] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)
    warm: bool = False
    chosen: str | None = None


class RouteTimer:
    """Per module and shape key, the route to run now; see the module docstring.

    Args:
        trials: timed runs of each route before choosing (the best of them counts, so one
            run slowed by the machine's other work does not decide).
        margin: another route replaces the default (the first) only when its best time is
            below ``margin`` times the default's: a near tie is noise, and the default is the
            route measured faster on most layers.
        clock: the clock (seconds). ``time.process_time`` by default: the CPU time of this
            process (all its threads, page faults included), which other processes on a busy
            machine do not inflate, unlike wall time.
    """

    #: A route every call uses instead, whatever the timings (tests set it to check each
    #: route against the oracle). ``None``: choose by timing.
    forced: str | None = None

    def __init__(
        self, trials: int = 2, margin: float = 0.85, clock: Callable[[], float] = time.process_time
    ) -> None:
        self.trials = trials
        self.margin = margin
        self.clock = clock
        self._trials: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, _Trials]] = (
            weakref.WeakKeyDictionary()
        )

    def choose(
        self, module: nn.Module, key: Hashable, routes: tuple[str, ...], device: torch.device
    ) -> tuple[str, bool]:
        """The route to run for this call and whether to time it (then pass the time to
        :meth:`record`)."""
        if self.forced is not None:
            return self.forced, False
        if device.type != "cpu" or len(routes) == 1:
            return routes[0], False
        trials = self._trials.setdefault(module, {}).setdefault(key, _Trials())
        if trials.chosen is not None:
            return trials.chosen, False
        if not trials.warm:  # the first call runs the default route untimed
            trials.warm = True
            return routes[0], False
        # The route with the fewest runs so far, in order: each is tried in turn.
        route = min(routes, key=lambda r: trials.runs.get(r, 0))
        return route, True

    def record(
        self,
        module: nn.Module,
        key: Hashable,
        routes: tuple[str, ...],
        route: str,
        seconds: float,
    ) -> None:
        """Adds one timed run; once every route has had ``trials`` runs the fastest is kept."""
        trials = self._trials.setdefault(module, {}).setdefault(key, _Trials())
        trials.runs[route] = trials.runs.get(route, 0) + 1
        trials.best[route] = min(seconds, trials.best.get(route, float("inf")))
        if all(trials.runs.get(r, 0) >= self.trials for r in routes):
            default = routes[0]
            fastest = min(routes, key=lambda r: trials.best[r])
            beats = trials.best[fastest] < self.margin * trials.best[default]
            trials.chosen = fastest if beats else default

    def settled(self, module: nn.Module) -> dict[Hashable, str]:
        """Key to the route kept, for every key of ``module`` whose timing is over."""
        keys = self._trials.get(module, {})
        return {key: t.chosen for key, t in keys.items() if t.chosen is not None}

    def chosen(self, module: nn.Module, key: Hashable) -> str | None:
        """The route kept for this module and key, ``None`` while still timing."""
        trials = self._trials.get(module, {}).get(key)
        return trials.chosen if trials is not None else None
