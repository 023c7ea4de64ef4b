"""Choosing a rule's route by timing: the fastest is kept, each step stays exact meanwhile."""

from __future__ import annotations

import torch
from conftest import assert_matches_oracle
from torch import nn

from lightning_gradwatch.probe.route_timing import RouteTimer
from lightning_gradwatch.probe.rules import conv as conv_rule


class _FakeClock:
    """A clock the test advances by hand (no timed test)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(timer: RouteTimer, clock: _FakeClock, module: nn.Module, cost: dict[str, float]) -> str:
    """One call: the route chosen, timed on the fake clock at ``cost[route]`` if asked."""
    routes = tuple(cost)
    route, timed = timer.choose(module, "key", routes, torch.device("cpu"))
    if timed:
        start = clock()
        clock.now += cost[route]
        timer.record(module, "key", routes, route, clock() - start)
    return route


def test_each_route_is_tried_then_the_fastest_is_kept() -> None:
    clock = _FakeClock()
    timer = RouteTimer(trials=2, clock=clock)
    module = nn.Linear(1, 1)
    cost = {"a": 3.0, "b": 1.0, "c": 2.0}
    ran = [_run(timer, clock, module, cost) for _ in range(7)]
    assert ran[0] == "a"  # the untimed first call runs the default
    assert sorted(ran[1:]) == ["a", "a", "b", "b", "c", "c"]
    assert timer.chosen(module, "key") == "b"
    assert [_run(timer, clock, module, cost) for _ in range(3)] == ["b"] * 3


def test_the_best_run_of_a_route_counts() -> None:
    """A slow first run (lazy initialisation) does not rule a route out."""
    clock = _FakeClock()
    timer = RouteTimer(trials=2, clock=clock)
    module = nn.Linear(1, 1)
    first = {"a": 10.0, "b": 2.0}
    for _ in range(3):
        _run(timer, clock, module, first)
    for _ in range(2):
        _run(timer, clock, module, {"a": 1.0, "b": 2.0})
    assert timer.chosen(module, "key") == "a"


def test_a_near_tie_keeps_the_default() -> None:
    clock = _FakeClock()
    timer = RouteTimer(trials=1, margin=0.85, clock=clock)
    module = nn.Linear(1, 1)
    for _ in range(3):
        _run(timer, clock, module, {"a": 1.0, "b": 0.9})
    assert timer.chosen(module, "key") == "a"


def test_keys_and_modules_are_timed_separately() -> None:
    clock = _FakeClock()
    timer = RouteTimer(trials=1, clock=clock)
    one, two = nn.Linear(1, 1), nn.Linear(1, 1)
    for _ in range(3):
        _run(timer, clock, one, {"a": 1.0, "b": 2.0})
    assert timer.chosen(one, "key") == "a"
    assert timer.chosen(two, "key") is None
    assert timer.chosen(one, "other") is None


def test_no_timing_off_the_cpu_or_when_forced() -> None:
    timer = RouteTimer()
    module = nn.Linear(1, 1)
    assert timer.choose(module, "k", ("a", "b"), torch.device("cuda")) == ("a", False)
    assert timer.choose(module, "k", ("a",), torch.device("cpu")) == ("a", False)
    timer.forced = "b"
    assert timer.choose(module, "k", ("a", "b"), torch.device("cpu")) == ("b", False)


def test_conv_steps_stay_exact_while_routes_are_timed() -> None:
    """Every step matches the oracle, through the timed steps and after the choice."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.Tanh(),
    ).double()
    x = torch.randn(3, 2, 7, 7, dtype=torch.float64)
    target = torch.randn(3, 8, 3, 3, dtype=torch.float64)
    routes = conv_rule.candidate_routes(model[2])
    for _ in range(len(routes) * conv_rule.ROUTES.trials + 2):
        assert_matches_oracle(model, x, target, sum_grad_squared=False)
    # Which route wins depends on this machine; that one was kept for each layer is checked.
    for conv in (model[0], model[2]):
        (trials,) = conv_rule.ROUTES._trials[conv].values()
        assert trials.chosen in conv_rule.candidate_routes(conv)
