"""``nn.Embedding``'s per-(sample, row) sums without ``torch.unique`` (whose output size is
read to the host: a synchronisation per step on an accelerator), against the oracle."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_oracle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    batch=st.integers(1, 4),
    steps=st.integers(1, 6),
    vocab=st.integers(1, 5),
    dim=st.integers(1, 3),
    padding=st.booleans(),
    sum_grad_squared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_repeated_rows_without_unique(
    monkeypatch: pytest.MonkeyPatch,
    batch: int,
    steps: int,
    vocab: int,
    dim: int,
    padding: bool,
    sum_grad_squared: bool,
    seed: int,
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.unique reads its output size to the host")

    monkeypatch.setattr(torch, "unique", refuse)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Embedding(vocab, dim, padding_idx=0 if padding else None), nn.Tanh(), nn.Linear(dim, 2)
    ).double()
    idx = torch.randint(0, vocab, (batch, steps))  # small vocabularies: many repeats
    target = torch.randn(batch, steps, 2, dtype=torch.float64)
    assert_matches_oracle(model, idx, target, sum_grad_squared=sum_grad_squared)
