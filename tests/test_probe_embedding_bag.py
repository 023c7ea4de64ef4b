"""nn.EmbeddingBag against the float64 per-sample oracle (rtol=1e-6); each bag is a sample.

The models take ``(dense, indices, offsets, per_sample_weights)``: ``dense`` ``(B, F)`` comes
first so that the model's batch (dim 0 of its first input) is the number of bags, as in a
recommendation model with dense and sparse features.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from conftest import assert_matches_oracle, run_probe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

VOCAB, DIM = 7, 3


class _Bags(nn.Module):
    """``tanh(bag(indices) + dense_proj(dense))``, so backprops depend on the sample."""

    def __init__(self, relu_inplace: bool = False, **bag_options: Any) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, DIM, **bag_options)
        self.dense = nn.Linear(2, DIM)
        self.relu_inplace = relu_inplace

    def forward(self, inputs: tuple[Tensor, Tensor, Tensor | None, Tensor | None]) -> Tensor:
        dense, indices, offsets, weights = inputs
        bags = self.bag(indices, offsets, per_sample_weights=weights)
        if self.relu_inplace:  # overwrites the bag's output after its forward
            bags = torch.relu_(bags)
        return torch.tanh(bags + self.dense(dense))


# 4 bags over repeated indices, an empty bag (1-D only), padding-index entries and a bag made
# of padding only.
_FLAT = torch.tensor([1, 1, 0, 3, 1, 5, 2, 2, 2, 0, 0, 4])
_OFFSETS = torch.tensor([0, 5, 5, 10])  # bag 2 is empty; bag 3 is [0, 0, 4]
_ROWS = torch.tensor([[1, 1, 0, 3], [5, 2, 2, 2], [0, 0, 0, 0], [4, 6, 4, 1]])


def _inputs(
    layout: str, include_last_offset: bool, per_sample_weights: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    if layout == "2d":
        indices, offsets = _ROWS, None
    else:
        indices, offsets = _FLAT, _OFFSETS
        if include_last_offset:
            offsets = torch.cat([offsets, torch.tensor([_FLAT.numel()])])
    batch = 4
    weights = torch.randn(indices.shape, dtype=torch.float64) if per_sample_weights else None
    return torch.randn(batch, 2, dtype=torch.float64), indices, offsets, weights


def _check(
    layout: str,
    mode: str,
    reduction: str = "mean",
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    per_sample_weights: bool = False,
    **kwargs: Any,
) -> None:
    torch.manual_seed(0)
    model = _Bags(
        mode=mode,
        padding_idx=padding_idx,
        include_last_offset=include_last_offset and layout == "1d",
        **kwargs,
    ).double()
    inputs = _inputs(layout, include_last_offset, per_sample_weights)
    with torch.no_grad():
        target = torch.randn_like(model(inputs))
    assert_matches_oracle(model, inputs, target, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("padding_idx", [None, 0], ids=["nopad", "pad0"])
@pytest.mark.parametrize("layout", ["1d", "2d"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_modes(mode: str, layout: str, padding_idx: int | None, reduction: str) -> None:
    _check(layout, mode, reduction, padding_idx)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_include_last_offset(mode: str, reduction: str) -> None:
    _check("1d", mode, reduction, padding_idx=0, include_last_offset=True)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("padding_idx", [None, 2], ids=["nopad", "pad2"])
@pytest.mark.parametrize("layout", ["1d", "2d"])
def test_per_sample_weights(layout: str, padding_idx: int | None, reduction: str) -> None:
    _check(layout, "sum", reduction, padding_idx, per_sample_weights=True)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_negative_padding_idx_and_last_offset_with_weights(mode: str) -> None:
    _check(
        "1d",
        mode,
        padding_idx=-3,  # the module stores it as VOCAB - 3
        include_last_offset=True,
        per_sample_weights=mode == "sum",
    )


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_output_modified_in_place(mode: str) -> None:
    _check("1d", mode, padding_idx=0, relu_inplace=True)


def test_max_with_ties() -> None:
    """Rows 1 and 2 are equal: the gradient goes to the row the kernel picked, and the
    squared norms must follow it."""
    torch.manual_seed(0)
    model = _Bags(mode="max").double()
    with torch.no_grad():
        model.bag.weight[2] = model.bag.weight[1]
    inputs = (torch.randn(2, 2, dtype=torch.float64), torch.tensor([[1, 2, 2], [2, 1, 1]]))
    inputs = (*inputs, None, None)
    with torch.no_grad():
        target = torch.randn_like(model(inputs))
    assert_matches_oracle(model, inputs, target)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_called_twice_and_tied(mode: str) -> None:
    """Two calls of the bag in one forward, and its weight tied to an nn.Embedding."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(VOCAB, DIM, mode=mode)
            self.tok = nn.Embedding(VOCAB, DIM)
            self.tok.weight = self.bag.weight

        def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:
            first, second = inputs
            a = self.bag(first)
            b = self.bag(second)
            return torch.tanh(a * b + self.tok(first[:, 0]))

    torch.manual_seed(1)
    model = Twice().double()
    inputs = (torch.randint(0, VOCAB, (4, 3)), torch.randint(0, VOCAB, (4, 2)))
    inputs[1][0] = inputs[0][0, :2]  # sample 0 uses the same rows in both calls
    with torch.no_grad():
        target = torch.randn_like(model(inputs))
    assert_matches_oracle(model, inputs, target)


@settings(
    max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    mode=st.sampled_from(["sum", "mean", "max"]),
    sizes=st.lists(st.integers(0, 4), min_size=1, max_size=5),
    padding=st.booleans(),
    weighted=st.booleans(),
    data=st.data(),
)
def test_random_bags(
    mode: str, sizes: list[int], padding: bool, weighted: bool, data: st.DataObject
) -> None:
    indices = torch.tensor(
        data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=sum(sizes), max_size=sum(sizes))),
        dtype=torch.int64,
    )
    offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    torch.manual_seed(2)
    model = _Bags(mode=mode, padding_idx=0 if padding else None).double()
    weights = (
        torch.randn(indices.shape, dtype=torch.float64) if weighted and mode == "sum" else None
    )
    inputs = (torch.randn(len(sizes), 2, dtype=torch.float64), indices, offsets, weights)
    with torch.no_grad():
        target = torch.randn_like(model(inputs))
    assert_matches_oracle(
        model, inputs, target, reduction=data.draw(st.sampled_from(["mean", "sum"]))
    )


# --------------------------------------------------------------------------- refusals
def test_scale_grad_by_freq_is_refused() -> None:
    torch.manual_seed(0)
    model = _Bags(mode="sum", scale_grad_by_freq=True).double()
    inputs = _inputs("2d", False, False)
    with pytest.warns(UserWarning, match="scale_grad_by_freq=True scales each row's gradient"):
        stats = run_probe(model, inputs, torch.zeros(4, DIM, dtype=torch.float64))
    assert "bag.weight" in stats.excluded and "bag.weight" not in stats.dot
    assert "dense.weight" in stats.dot


def test_entries_past_the_last_offset_are_refused() -> None:
    torch.manual_seed(0)
    model = _Bags(mode="mean", include_last_offset=True).double()
    inputs = (torch.randn(3, 2, dtype=torch.float64), _FLAT, torch.tensor([0, 5, 5, 10]), None)
    with pytest.warns(UserWarning, match=r"make offsets\[-1\] equal len\(input\)"):
        stats = run_probe(model, inputs, torch.zeros(3, DIM, dtype=torch.float64))
    assert "bag.weight" in stats.excluded and "bag.weight" not in stats.dot


def test_subclass_with_own_forward_is_not_summed_as_a_bag() -> None:
    class Doubled(nn.EmbeddingBag):
        def forward(self, *args: Any, **kwargs: Any) -> Tensor:  # type: ignore[override]
            return 2 * super().forward(*args, **kwargs)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = Doubled(VOCAB, DIM)
            self.head = nn.Linear(DIM, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.tanh(self.bag(x)))

    torch.manual_seed(0)
    model = Model().double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = run_probe(model, _ROWS, torch.zeros(4, 2, dtype=torch.float64))
    if "bag.weight" in stats.dot:
        # A generic per-sample replay of its own forward is exact: check it against the oracle.
        assert_matches_oracle(model, _ROWS, torch.zeros(4, 2, dtype=torch.float64))
    else:
        assert any("bag" in str(w.message) for w in caught)
        assert "bag.weight" in stats.excluded
