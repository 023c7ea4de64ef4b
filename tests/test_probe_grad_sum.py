"""``grad_sum`` from autograd's own batch gradient, and where the probe must not take it.

With float32/float64 parameters and backprops, autograd's part of a parameter's gradient that
comes from one linear or convolution call (read from that call's own edge in the graph), or
the whole gradient on a forward the use checker watched, is exactly ``sum_i g_i`` (times the
loss reduction and scale), so the rules skip forming it again. Everywhere else (a module called
twice, a backward that skips a parameter, autocast) the rules form it from the per-sample
terms. Either way it must equal the oracle's sum of per-sample gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, assert_matches_oracle, partial_backward, squared_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import per_sample_grads
from torch import Tensor, nn

from lightning_gradwatch import GradientProbe
from lightning_gradwatch.probe.finalize import _Finalize


@dataclass
class _Seen:
    need_grad_sum: bool


@pytest.fixture
def contexts(monkeypatch: pytest.MonkeyPatch) -> list[_Seen]:
    """For every rule call of a probe with ``sum_grad_squared``, whether the rule was asked
    to form ``sum_i g_i`` itself, in order."""
    seen: list[_Seen] = []
    original = _Finalize._autograd_sum_exact

    def spy(self: Any, owner: Any, calls: Any) -> bool:
        exact = original(self, owner, calls)
        seen.append(_Seen(need_grad_sum=not exact))
        return exact

    monkeypatch.setattr(_Finalize, "_autograd_sum_exact", spy)
    return seen


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.conv = nn.Conv1d(8, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.emb(idx)
        h = self.attn(h, h, h, need_weights=False)[0]
        h = torch.tanh(self.conv(h.transpose(1, 2))).mean(-1)
        return self.head(h)


def _models() -> list[tuple[str, nn.Module, Tensor, Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    conv2d = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
    return [
        ("mlp", mlp, torch.randn(6, 5), torch.randn(6, 3)),
        ("seq-linear", nn.Linear(5, 3), torch.randn(6, 4, 5), torch.randn(6, 4, 3)),
        ("conv2d", conv2d, torch.randn(6, 2, 6, 6), torch.randn(6, 3)),
        ("attention", _Attention(), torch.randint(0, 7, (6, 5)), torch.randn(6, 3)),
    ]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", range(4), ids=[m[0] for m in _models()])
def test_grad_sum_from_autograd_matches_oracle(
    case: int, reduction: str, contexts: list[_Seen]
) -> None:
    _, model, x, y = _models()[case]
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    assert_matches_oracle(model, x, y.double(), reduction=reduction, loss_scale=1.0)
    # The rules were told to leave sum_i g_i to autograd (the route under test).
    assert contexts and not any(c.need_grad_sum for c in contexts)


def test_tied_weights(contexts: list[_Seen]) -> None:
    torch.manual_seed(1)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.out = nn.Linear(4, 6, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, idx: Tensor) -> Tensor:
            return self.out(torch.tanh(self.emb(idx))).mean(1)

    model = Tied().double()
    assert_matches_oracle(model, torch.randint(0, 6, (5, 3)), torch.randn(5, 6).double())


def test_gradient_accumulation_sees_each_backward_alone(contexts: list[_Seen]) -> None:
    """With ``.grad`` already holding an earlier micro-batch, ``grad_sum`` is still this
    backward's sum, scaled back by ``loss_scale``; and the probe leaves ``.grad`` as autograd
    alone would make it."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    reference = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    reference.load_state_dict(model.state_dict())
    batches = [(torch.randn(3, 4).double(), torch.randn(3, 2).double()) for _ in range(3)]
    probe = GradientProbe(model, sum_grad_squared=True, loss_scale=0.5, verify="always")
    names = [n for n, _ in model.named_parameters()]
    sums = []
    with probe:
        for x, y in batches:
            (squared_error(model(x), y).mean() * 0.5).backward()
            sums.append(probe.stats.grad_sum)
    for x, y in batches:
        (squared_error(reference(x), y).mean() * 0.5).backward()
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert torch.equal(p.grad, q.grad), n
    model.zero_grad(set_to_none=True)
    for (x, y), got in zip(batches, sums, strict=True):
        expected = per_sample_grads(model, squared_error, x, y, names)
        for n in names:
            assert_close(got[n], expected[n].sum(0), f"grad_sum[{n}]")
    assert not any(c.need_grad_sum for c in contexts)


def test_grad_sum_is_not_the_grad_tensor() -> None:
    """The hook's tensor can become ``.grad`` itself; later accumulation into ``.grad`` must
    not change a reported ``grad_sum``."""
    torch.manual_seed(3)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
    probe = GradientProbe(model, sum_grad_squared=True, loss_reduction="sum")
    with probe:
        squared_error(model(x), y).sum().backward()
    first = {n: t.clone() for n, t in probe.stats.grad_sum.items()}
    kept = probe.stats
    squared_error(model(x), y).sum().backward()  # accumulates into .grad, unprobed
    for n, t in first.items():
        assert torch.equal(kept.grad_sum[n], t), n


def test_weight_penalty_stays_out_of_grad_sum(contexts: list[_Seen]) -> None:
    """A penalty is in autograd's gradient but in no sample's: grad_sum excludes it. Each
    call's part is read from its own edge, which the penalty's edge does not touch."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3).double(), torch.randn(5, 2).double()
    names = [n for n, _ in model.named_parameters()]
    probe = GradientProbe(model, sum_grad_squared=True)
    sums = []
    with pytest.warns(UserWarning, match="outside any module"), probe:
        for _ in range(2):  # also after the use checker has left
            contexts.clear()
            loss = squared_error(model(x), y).mean() + 0.3 * model[0].weight.pow(2).sum()
            loss.backward()
            sums.append(probe.stats.grad_sum)
            assert [c.need_grad_sum for c in contexts] == [False, False]
    model.zero_grad(set_to_none=True)
    expected = per_sample_grads(model, squared_error, x, y, names)
    for got in sums:
        for n in names:
            assert_close(got[n], expected[n].sum(0), f"grad_sum[{n}]")


def test_penalty_switched_on_later_is_seen(contexts: list[_Seen]) -> None:
    """A use outside the modules that starts after the first step (a penalty from a later
    epoch on), unseen by the use checker, must not reach grad_sum: it is read from the
    calls' own edges on every step."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3).double(), torch.randn(5, 2).double()
    names = [n for n, _ in model.named_parameters()]
    probe = GradientProbe(model, sum_grad_squared=True)  # verify="first", the default
    expected = per_sample_grads(model, squared_error, x, y, names)
    with probe:  # the checker has left by step 2, so no warning: the sum stays exact
        for step in range(3):
            contexts.clear()
            loss = squared_error(model(x), y).mean()
            if step == 2:
                loss = loss + 0.3 * model[0].weight.pow(2).sum()
            loss.backward()
            model.zero_grad(set_to_none=True)
            for n in names:
                assert_close(probe.stats.grad_sum[n], expected[n].sum(0), f"grad_sum[{n}]")
    assert [c.need_grad_sum for c in contexts] == [False, False]


def test_verify_always_uses_autograd_every_step(contexts: list[_Seen]) -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3).double(), torch.randn(5, 2).double()
    names = [n for n, _ in model.named_parameters()]
    expected = per_sample_grads(model, squared_error, x, y, names)
    with GradientProbe(model, sum_grad_squared=True, verify="always") as probe:
        for _ in range(3):
            contexts.clear()
            squared_error(model(x), y).mean().backward()
            model.zero_grad(set_to_none=True)
            assert [c.need_grad_sum for c in contexts] == [False, False]
            for n in names:
                assert_close(probe.stats.grad_sum[n], expected[n].sum(0), f"grad_sum[{n}]")


def test_without_use_check_the_call_edges_still_give_the_sum(contexts: list[_Seen]) -> None:
    torch.manual_seed(5)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
    assert_matches_oracle(model, x, y, verify="never")
    assert contexts and not any(c.need_grad_sum for c in contexts)


def test_autocast_keeps_the_per_sample_sum(contexts: list[_Seen]) -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    probe = GradientProbe(model, sum_grad_squared=True)
    with probe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    assert contexts and all(c.need_grad_sum for c in contexts)
    assert set(probe.stats.grad_sum) == {n for n, _ in model.named_parameters()}


def test_module_called_twice_forms_the_sum(contexts: list[_Seen]) -> None:
    """Two calls of one module have two edges into its weight; only one call's node is at
    hand when the rule runs, so the rule forms the sum (no use check to lean on either)."""
    torch.manual_seed(8)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.fc(torch.tanh(self.fc(x))))

    model = Twice().double()
    x, y = torch.randn(5, 4).double(), torch.randn(5, 2).double()
    assert_matches_oracle(model, x, y, verify="never")
    # Backward order: head (from its edge), then fc (formed by the rule).
    assert [c.need_grad_sum for c in contexts] == [False, True]


def test_penalty_on_conv_and_circular_padding(contexts: list[_Seen]) -> None:
    """A convolution's part is read from its node (a penalty on its weight stays out); with
    ``padding_mode="circular"`` the node saw a padded copy of the input, not the call's own
    input, so the rule forms the sum."""
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"),
        nn.Tanh(),
        nn.Conv1d(3, 2, 3),
        nn.Flatten(),
        nn.Linear(8, 2),
    ).double()
    x, y = torch.randn(4, 2, 6).double(), torch.randn(4, 2).double()
    names = [n for n, _ in model.named_parameters()]
    expected = per_sample_grads(model, squared_error, x, y, names)
    probe = GradientProbe(model, sum_grad_squared=True, verify="never")
    with probe:
        for _ in range(2):
            contexts.clear()
            loss = squared_error(model(x), y).mean() + 0.2 * model[2].weight.pow(2).sum()
            loss.backward()
            model.zero_grad(set_to_none=True)
            for n in names:
                assert_close(probe.stats.grad_sum[n], expected[n].sum(0), f"grad_sum[{n}]")
            assert [c.need_grad_sum for c in contexts] == [False, False, True]


def test_backward_that_skips_a_parameter_forms_its_sum(contexts: list[_Seen]) -> None:
    """``backward(inputs=...)`` leaves other parameters' edges unexecuted: their owners form
    the sum, and every grad_sum is still the oracle's."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3).double(), torch.randn(5, 2).double()
    names = [n for n, _ in model.named_parameters()]
    expected = per_sample_grads(model, squared_error, x, y, names)
    with GradientProbe(model, sum_grad_squared=True, verify="never") as probe:
        squared_error(model(x), y).mean().backward(inputs=[model[0].weight])
    assert model[0].bias.grad is None and model[2].weight.grad is None
    for n in names:
        assert_close(probe.stats.grad_sum[n], expected[n].sum(0), f"grad_sum[{n}]")
    assert [c.need_grad_sum for c in contexts] == [True, True]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hidden=st.integers(1, 5),
    out=st.integers(1, 4),
    batch=st.integers(1, 5),
    norm=st.booleans(),
    asked=st.sampled_from(["weight", "bias", "weight+bias"]),
    how=st.sampled_from(["backward", "autograd.grad"]),
)
def test_watched_forward_with_a_backward_that_skips_a_parameter(
    hidden: int, out: int, batch: int, norm: bool, asked: str, how: str
) -> None:
    """With the use checker's verdict (``verify="first"``, the default), autograd's whole
    gradient stands in for the sum only where the backward accumulates it: a backward asked
    for part of the last layer's parameters forms the others' sums itself, and every sum and
    square of the layers it reaches is the oracle's (not zero); the layer below is refused."""
    torch.manual_seed(hidden + 7 * out + 31 * batch)
    layers: list[nn.Module] = [nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, out)]
    if norm:
        layers.append(nn.LayerNorm(out))
    model = nn.Sequential(*layers).double()
    x, y = torch.randn(batch, 3).double(), torch.randn(batch, out).double()
    names = [n for n, _ in model.named_parameters()]
    expected = per_sample_grads(model, squared_error, x, y, names)
    model.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    inputs = [params[f"2.{part}"] for part in asked.split("+")]
    with GradientProbe(model, sum_grad_squared=True) as probe:
        partial_backward(squared_error(model(x), y).mean(), inputs, how)
    stats = probe.stats
    reached = [n for n in names if not n.startswith("0.")]
    for n in reached:
        assert_close(stats.grad_sum[n], expected[n].sum(0), f"grad_sum[{n}]")
        assert_close(stats.sum_sq[n], expected[n].pow(2).sum(0), f"sum_sq[{n}]")
    assert set(stats.excluded) == {"0.weight", "0.bias"}


def test_training_is_unchanged_with_a_penalty() -> None:
    """Reading a call's edge leaves ``.grad`` bitwise as autograd alone makes it, and the
    reported sums stay as they were when ``.grad`` is modified in place afterwards."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    reference = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(5, 3), torch.randn(5, 2)

    def loss_of(m: nn.Module) -> Tensor:
        return squared_error(m(x), y).mean() + 0.1 * m[0].weight.pow(2).sum()

    probe = GradientProbe(model, sum_grad_squared=True, verify="never")
    with probe:
        loss_of(model).backward()
    loss_of(reference).backward()
    kept = {n: t.clone() for n, t in probe.stats.grad_sum.items()}
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert torch.equal(p.grad, q.grad), n
        p.grad.mul_(0.0)
        assert torch.equal(probe.stats.grad_sum[n], kept[n]), n


def test_autograd_grad_forms_the_sum(contexts: list[_Seen]) -> None:
    """``torch.autograd.grad`` accumulates into no parameter and cannot be asked which edges
    it runs: the rules form the sum."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3).double(), torch.randn(5, 2).double()
    names = [n for n, _ in model.named_parameters()]
    expected = per_sample_grads(model, squared_error, x, y, names)
    with GradientProbe(model, sum_grad_squared=True, verify="never") as probe:
        grads = torch.autograd.grad(squared_error(model(x), y).mean(), list(model.parameters()))
    for n, g in zip(names, grads, strict=True):
        assert_close(probe.stats.grad_sum[n], expected[n].sum(0), f"grad_sum[{n}]")
        assert_close(g, expected[n].mean(0), f"autograd's {n}")
    assert [c.need_grad_sum for c in contexts] == [True, True]


def test_a_promised_sum_that_never_comes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where autograd's gradient was to stand in for a sum and did not arrive (here forced:
    the decision says yes, and with ``verify="never"`` no hook copies the gradient), the
    parameter is left out with a reason rather than given a zero sum."""
    monkeypatch.setattr(_Finalize, "_autograd_sum_exact", lambda self, owner, calls: True)
    torch.manual_seed(12)
    model = nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 2)).double()
    x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
    with GradientProbe(model, sum_grad_squared=True, verify="never") as probe:
        squared_error(model(x), y).mean().backward()
    stats = probe.stats
    # The Linear rule skips the sum it was told autograd would give; LayerNorm's forms it
    # anyway (from the same per-sample values as its squares), so it stands.
    assert set(stats.excluded) == {"1.weight", "1.bias"}
    assert all("did not reach the probe" in why for why in stats.excluded.values())
    assert set(stats.grad_sum) == {"0.weight", "0.bias"}
    assert "1.weight" not in stats.dot
