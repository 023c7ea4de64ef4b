"""A Linear's ``<G_i, W>`` from autograd's gradient at its input (``probe/input_grad.py``).

Where a Linear call's input requires grad, the probe does not keep the call's output from the
forward to the backward: the rule reads ``(delta_t W) . a_t`` from the gradient the call's
product node sends to its input. Where it cannot (the first layer, a backward that does not
form the input's gradient), it keeps the output or recomputes ``W a``. Every route must match
the float64 oracle.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from conftest import assert_close, assert_matches_oracle, squared_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import expected_stats, per_sample_grads
from torch import Tensor, nn

from lightning_gradwatch import GradientProbe
from lightning_gradwatch.probe.registry import Call
from lightning_gradwatch.probe.rules.linear import LinearRule

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def routes(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """For every Linear rule call, per call: ``"grad"`` (read from the input's gradient),
    ``"kept"`` (output kept) or ``"recompute"`` (neither: the backward forms no input
    gradient), in order."""
    seen: list[list[str]] = []
    original = LinearRule.compute

    def spy(self: Any, module: nn.Module, calls: list[Call], ctx: Any) -> Any:
        kinds = []
        for call in calls:
            route = call.input_grad
            if route is not None:
                kinds.append("grad" if route.usable else "recompute")
            else:
                kinds.append("kept" if call.outputs[0] is not None else "recompute")
        seen.append(kinds)
        return original(self, module, calls, ctx)

    monkeypatch.setattr(LinearRule, "compute", spy)
    return seen


def _target(model: nn.Module, x: Tensor, seed: int) -> Tensor:
    with torch.no_grad():
        out = model(x)
    return torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))


class _Residual(nn.Module):
    """``h = first(x)``, then a residual block ``h + back(tanh(wide(tanh(h))))``, then ``last``:
    ``h`` feeds both the residual and ``wide`` (its input is used twice); with ``twice``,
    ``wide`` is called again on another input."""

    def __init__(self, i: int, h: int, w: int, o: int, bias: bool, twice: bool) -> None:
        super().__init__()
        self.first = nn.Linear(i, h, bias=bias)
        self.wide = nn.Linear(h, w, bias=bias)  # widens: reads its input's gradient
        self.back = nn.Linear(w, h, bias=bias)
        self.last = nn.Linear(h, o, bias=bias)
        self.twice = twice

    def forward(self, x: Tensor) -> Tensor:
        h = self.first(x)
        r = self.wide(torch.tanh(h))
        if self.twice:
            r = r * self.wide(torch.sin(h))
        return self.last(torch.tanh(h + self.back(torch.tanh(r))))


@SETTINGS
@given(
    batch=st.integers(1, 5),
    lead=st.lists(st.integers(1, 3), max_size=2),
    sizes=st.lists(st.integers(1, 5), min_size=4, max_size=4),
    bias=st.booleans(),
    twice=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
    sum_grad_squared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_residual_property(batch, lead, sizes, bias, twice, reduction, sum_grad_squared, seed):
    torch.manual_seed(seed)
    i, h, extra, o = sizes
    model = _Residual(i, h, h + extra, o, bias, twice).double()
    x = torch.randn(batch, *lead, i, dtype=torch.float64)
    assert_matches_oracle(
        model, x, _target(model, x, seed), reduction=reduction, sum_grad_squared=sum_grad_squared
    )


def test_routes_taken(routes: list[list[str]]) -> None:
    """The first layer (input needs no grad) keeps its output, and so do layers that do not
    widen; a widening one reads its input's gradient, in both calls of a module called
    twice."""
    torch.manual_seed(0)
    model = _Residual(3, 4, 6, 5, True, twice=True).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert_matches_oracle(model, x, _target(model, x, 0))
    assert sorted(routes) == sorted([["kept"], ["grad", "grad"], ["kept"], ["grad"]])


def test_output_not_held_until_backward() -> None:
    """Between forward and backward the probe holds no output of a Linear whose input
    requires grad."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 6)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    probe = GradientProbe(model, verify="never")
    with probe:
        out = model(x)
        held = {owner.module_name: owner.calls[0].outputs for owner in probe._owners}
        out.sum().backward()
    assert held["0"][0] is not None and held["2"] == [None]
    assert probe.stats is not None and torch.isfinite(probe.stats.dot["2.weight"]).all()


@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("inplace", ["relu_", "mul_"])
def test_inplace_op_on_the_output(lead: tuple[int, ...], inplace: str) -> None:
    """An in-place op on the output after the forward does not change what autograd's input
    gradient holds (the output's hook sees the gradient of the value the module produced)."""
    torch.manual_seed(1)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.b(torch.tanh(self.a(x)))
            h = h.relu_() if inplace == "relu_" else h.mul_(1.5)
            return self.c(h)

    model = Model().double()
    x = torch.randn(5, *lead, 3, dtype=torch.float64)
    assert_matches_oracle(model, x, _target(model, x, 1))


def test_penalty_on_the_weight() -> None:
    """A weight penalty adds to autograd's gradient of the weight, not to the input's: the
    dot stays the samples' own."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).double()
    x, y = torch.randn(5, 3).double(), torch.randn(5, 5).double()
    names = [n for n, _ in model.named_parameters()]
    grads = per_sample_grads(model, squared_error, x, y, names)
    dot, sq, _ = expected_stats(model, grads)
    model.zero_grad(set_to_none=True)
    with GradientProbe(model, sum_grad_squared=True, verify="never") as probe:
        loss = squared_error(model(x), y).mean() + 0.3 * model[2].weight.pow(2).sum()
        loss.backward()
    for n in names:
        assert_close(probe.stats.dot[n], dot[n], f"dot[{n}]")
        assert_close(probe.stats.sq_norm[n], sq[n], f"sq_norm[{n}]")


@pytest.mark.parametrize("only", ["0.weight", "2.weight", "4.weight"])
def test_backward_with_inputs(routes: list[list[str]], only: str) -> None:
    """``backward(inputs=...)``: a layer whose input's gradient that backward does not form
    recomputes ``W a``; every statistic stays the oracle's."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 7)
    ).double()
    x, y = torch.randn(5, 3).double(), torch.randn(5, 7).double()
    names = [n for n, _ in model.named_parameters()]
    grads = per_sample_grads(model, squared_error, x, y, names)
    dot, sq, _ = expected_stats(model, grads)
    model.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    with GradientProbe(model, verify="never") as probe:
        squared_error(model(x), y).mean().backward(inputs=[params[only]])
    # Layers below `only` get no output gradient from this backward.
    reached = names[names.index(only) :]
    for n in reached:
        assert_close(probe.stats.dot[n], dot[n], f"dot[{n}]")
        assert_close(probe.stats.sq_norm[n], sq[n], f"sq_norm[{n}]")
    expected = {
        "0.weight": [["grad"], ["grad"], ["kept"]],
        "2.weight": [["grad"], ["recompute"]],
        "4.weight": [["recompute"]],
    }[only]
    assert routes == expected


@pytest.mark.parametrize("wrt", ["all", "last"])
def test_autograd_grad(routes: list[list[str]], wrt: str) -> None:
    """``torch.autograd.grad``: the input's gradient where it forms it (with respect to an
    earlier layer's parameters), else ``W a`` recomputed."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6)).double()
    x, y = torch.randn(5, 3).double(), torch.randn(5, 6).double()
    names = [n for n, _ in model.named_parameters()]
    grads = per_sample_grads(model, squared_error, x, y, names)
    dot, _, _ = expected_stats(model, grads)
    params = list(model.parameters()) if wrt == "all" else [model[2].weight]
    with GradientProbe(model, verify="never") as probe:
        torch.autograd.grad(squared_error(model(x), y).mean(), params)
    for n in names if wrt == "all" else ["2.weight", "2.bias"]:
        assert_close(probe.stats.dot[n], dot[n], f"dot[{n}]")
    assert routes == ([["grad"], ["kept"]] if wrt == "all" else [["recompute"]])


def test_sequence_first_transformer_layer(routes: list[list[str]]) -> None:
    """Inside a sequence-first transformer layer the Linear's input gradient is position-major:
    its dots are summed over positions along the right dim."""
    torch.manual_seed(5)
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0).double()
    x = torch.randn(4, 3, 8, dtype=torch.float64)  # (T, B, E)
    y = torch.randn(4, 3, 8, dtype=torch.float64)

    def loss_fn(out: Tensor, target: Tensor) -> Tensor:
        return (out - target).pow(2).sum((0, 2))

    assert_matches_oracle(model, x, y, loss_fn=loss_fn, batch_size=3)
    assert routes.count(["grad"]) == 1  # linear1 (8 -> 12); linear2 keeps its output


def test_training_is_bitwise_unchanged() -> None:
    """Reading the input's gradient in a post-hook leaves every ``.grad`` bitwise as autograd
    alone makes it."""
    torch.manual_seed(6)
    model = _Residual(3, 5, 7, 2, True, twice=True)
    reference = _Residual(3, 5, 7, 2, True, twice=True)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 2, 3), torch.randn(6, 2, 2)
    with GradientProbe(model, sum_grad_squared=True, verify="never") as probe:
        squared_error(model(x), y).mean().backward()
    squared_error(reference(x), y).mean().backward()
    assert probe.stats is not None and len(probe.stats.dot) == 8
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert torch.equal(p.grad, q.grad), n


def test_captures_released_while_the_caller_keeps_the_graph() -> None:
    """The route's hook stays on a graph the caller keeps (through ``loss``); the layer input
    it reads must not stay alive with it."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 8))
    probe = GradientProbe(model, verify="never")
    with probe:
        loss = model(torch.randn(6, 3, 4)).pow(2).sum()
        calls = [call for owner in probe._owners for call in owner.calls]
        assert calls[1].outputs == [None] and calls[1].input_grad is not None
        captured = [weakref.ref(t) for call in calls for t in call.args]
        route = calls[1].input_grad
        loss.backward()
        gc.collect()
        assert all(ref() is None for ref in captured)
        assert route.input is None and route.dots is None
    assert loss.grad_fn is not None  # the graph is still referenced


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_layers_keep_their_output(dtype: torch.dtype) -> None:
    """A 16-bit input gradient is rounded to 16 bits: such a layer keeps its output."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6)).to(dtype)
    probe = GradientProbe(model, verify="never")
    with probe:
        model(torch.randn(5, 3, dtype=dtype))
        held = {owner.module_name: owner.calls[0] for owner in probe._owners}
        assert held["2"].input_grad is None and held["2"].outputs[0] is not None
