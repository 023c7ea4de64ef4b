"""LayerNorm's ``xhat`` from the statistics its kernel saved for the backward, against the
float64 oracle, and the recomputation where they are not this call's."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_oracle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_gradwatch.probe.rules.norm import LayerNormRule


class _Normed(nn.Module):
    """Linear, LayerNorm over the trailing ``dims`` dims, tanh; optionally the norm twice."""

    def __init__(self, shape: tuple[int, ...], dims: int, twice: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(shape[-1], shape[-1])
        self.norm = nn.LayerNorm(shape[len(shape) - dims :])
        self.twice = twice

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.fc(x))
        if self.twice:
            h = self.norm(torch.tanh(h))
        return torch.tanh(h)


def _count_recomputes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    normalise = LayerNormRule.normalise

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return normalise(self, *args, **kwargs)

    monkeypatch.setattr(LayerNormRule, "normalise", counted)
    return calls


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    batch=st.integers(1, 4),
    steps=st.integers(1, 4),
    width=st.integers(2, 5),  # one entry normalises to 0: only rounding is left
    dims=st.integers(1, 2),
    sum_grad_squared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_saved_statistics_match_oracle(
    monkeypatch: pytest.MonkeyPatch,
    batch: int,
    steps: int,
    width: int,
    dims: int,
    sum_grad_squared: bool,
    seed: int,
) -> None:
    recomputes = _count_recomputes(monkeypatch)
    torch.manual_seed(seed)
    shape = (batch, steps, width)
    model = _Normed(shape, dims, twice=False).double()
    x = torch.randn(*shape, dtype=torch.float64)
    assert_matches_oracle(model, x, torch.randn_like(x), sum_grad_squared=sum_grad_squared)
    assert not recomputes


def test_two_calls_recompute(monkeypatch: pytest.MonkeyPatch) -> None:
    """A norm called twice in one forward: its calls' statistics are recomputed, exactly."""
    recomputes = _count_recomputes(monkeypatch)
    torch.manual_seed(0)
    model = _Normed((3, 4, 5), 1, twice=True).double()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    assert_matches_oracle(model, x, torch.randn_like(x))
    assert recomputes


class _SeqFirst(nn.Module):
    """The norm sees samples along dim 1: the probe moves them to dim 0, so the captured
    input is a permuted view whose layout is not the saved input's."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(5)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, E)
        return torch.tanh(self.norm(x.transpose(0, 1).contiguous())).transpose(0, 1)


def test_moved_sample_dim_recomputes(monkeypatch: pytest.MonkeyPatch) -> None:
    recomputes = _count_recomputes(monkeypatch)
    torch.manual_seed(0)
    model = _SeqFirst().double()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    assert_matches_oracle(model, x, torch.randn_like(x))
    assert recomputes
