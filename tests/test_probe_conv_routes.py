"""The convolution rule's routes against the float64 oracle, each forced where the rule would
pick another (the benchmark-sized layers that pick them by default are too slow for tests)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_oracle
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_gradwatch.probe import _conv_linalg

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    # The fixture only sets a constant, the same for every generated input.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture
def offsets_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every 1-D convolution takes the per-offset route, whatever its channels."""
    monkeypatch.setattr(_conv_linalg, "OFFSET_MIN_CHANNELS", 1)


def _target(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(
    batch=st.integers(1, 4),
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 3),
    padding=st.sampled_from([0, 1, 2, "same", "valid"]),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    length=st.integers(1, 12),
    bias=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
    sum_grad_squared=st.booleans(),
    chunk_elements=st.sampled_from([1, 7, 2**24]),
    seed=st.integers(0, 2**16),
)
def test_offset_route_property(
    offsets_always: None,
    batch: int,
    groups: int,
    in_per_group: int,
    out_per_group: int,
    kernel: int,
    stride: int,
    dilation: int,
    padding: int | str,
    padding_mode: str,
    length: int,
    bias: bool,
    reduction: str,
    sum_grad_squared: bool,
    chunk_elements: int,
    seed: int,
) -> None:
    if padding == "same":
        stride = 1
    span = dilation * (kernel - 1) + 1
    pad = (span - 1) // 2 + 1 if padding == "same" else (padding if isinstance(padding, int) else 0)
    assume(length + 2 * pad >= span)
    assume(padding_mode != "reflect" or pad < length)
    assume(padding_mode != "circular" or pad <= length)
    torch.manual_seed(seed)
    conv = nn.Conv1d(
        groups * in_per_group,
        groups * out_per_group,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=padding_mode,
    )
    model = nn.Sequential(conv, nn.Tanh()).double()
    x = torch.randn(batch, groups * in_per_group, length, dtype=torch.float64)
    assert _conv_linalg.prefer_offsets(conv)
    assert_matches_oracle(
        model,
        x,
        _target(model, x, seed),
        reduction=reduction,
        sum_grad_squared=sum_grad_squared,
        chunk_elements=chunk_elements,
    )


@pytest.mark.parametrize("sum_grad_squared", [False, True])
def test_offset_route_on_a_wide_strided_layer(sum_grad_squared: bool) -> None:
    """The route the rule picks by default (16 channels), stride 2, between two other layers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(16, 16, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16 * 5, 3),
    ).double()
    assert _conv_linalg.prefer_offsets(model[2]) and not _conv_linalg.prefer_offsets(model[0])
    x = torch.randn(5, 2, 10, dtype=torch.float64)
    assert_matches_oracle(
        model, x, _target(model, x, 1), sum_grad_squared=sum_grad_squared, chunk_elements=300
    )


def test_offset_route_is_not_taken_for_shared_or_kept_gradients(offsets_always: None) -> None:
    """Two calls of one convolution add their gradients before the norm: the unfolded route
    handles that, and its numbers still match the oracle."""
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 3, 3, padding=1).double()

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.tanh(self.conv(x)))

    model = Twice()
    x = torch.randn(4, 3, 9, dtype=torch.float64)
    assert_matches_oracle(model, x, _target(model, x, 2))
