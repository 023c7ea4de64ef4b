"""Property tests: random shapes, options and batch sizes (B=1 included) against the oracle."""

from __future__ import annotations

import math

import torch
from conftest import assert_matches_oracle
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _target(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(
    batch=st.integers(1, 5),
    lead=st.lists(st.integers(1, 4), max_size=2),
    in_features=st.integers(1, 6),
    out_features=st.integers(1, 6),
    bias=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
    sum_grad_squared=st.booleans(),
    chunk_elements=st.sampled_from([1, 5, 2**24]),
    seed=st.integers(0, 2**16),
)
def test_linear_property(
    batch, lead, in_features, out_features, bias, reduction, sum_grad_squared, chunk_elements, seed
) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=bias), nn.Tanh()).double()
    x = torch.randn(batch, *lead, in_features, dtype=torch.float64)
    assert_matches_oracle(
        model,
        x,
        _target(model, x, seed),
        reduction=reduction,
        sum_grad_squared=sum_grad_squared,
        chunk_elements=chunk_elements,
    )


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def conv_configs(draw: st.DrawFn) -> dict:
    nd = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 2))
    kernel = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    dilation = draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "circular", "replicate"]))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding_kind == "same":
        stride: list[int] | int = 1
        padding: object = "same"
    else:
        stride = draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd))
        if padding_kind == "valid":
            padding = "valid"
        elif padding_kind == "int":
            padding = draw(st.integers(0, 2))
        else:
            padding = draw(st.lists(st.integers(0, 2), min_size=nd, max_size=nd))
    max_size = 7 if nd < 3 else 4
    spatial = draw(st.lists(st.integers(1, max_size), min_size=nd, max_size=nd))
    return {
        "nd": nd,
        "in_channels": groups * draw(st.integers(1, 2)),
        "out_channels": groups * draw(st.integers(1, 3)),
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "bias": draw(st.booleans()),
        "padding_mode": padding_mode,
        "spatial": spatial,
    }


def _conv_is_valid(cfg: dict) -> bool:
    nd = cfg["nd"]
    pad = cfg["padding"]
    stride = cfg["stride"] if isinstance(cfg["stride"], list) else [1] * nd
    for d in range(nd):
        span = cfg["dilation"][d] * (cfg["kernel_size"][d] - 1) + 1
        if pad == "same":
            total = span - 1
            left, right = total // 2, total - total // 2
        elif pad == "valid":
            left = right = 0
        else:
            left = right = pad if isinstance(pad, int) else pad[d]
        size = cfg["spatial"][d]
        if cfg["padding_mode"] == "reflect" and max(left, right) >= size:
            return False
        if cfg["padding_mode"] == "circular" and max(left, right) > size:
            return False
        if size + left + right < span:
            return False
    del stride
    return True


@SETTINGS
@given(
    cfg=conv_configs(),
    batch=st.integers(1, 3),
    reduction=st.sampled_from(["mean", "sum"]),
    sum_grad_squared=st.booleans(),
    chunk_elements=st.sampled_from([1, 2**24]),
    seed=st.integers(0, 2**16),
)
def test_conv_property(cfg, batch, reduction, sum_grad_squared, chunk_elements, seed) -> None:
    assume(_conv_is_valid(cfg))
    torch.manual_seed(seed)
    cfg = dict(cfg)
    nd, spatial = cfg.pop("nd"), cfg.pop("spatial")
    conv = _CONV[nd](**cfg)
    model = nn.Sequential(conv, nn.Tanh()).double()
    x = torch.randn(batch, cfg["in_channels"], *spatial, dtype=torch.float64)
    assert_matches_oracle(
        model,
        x,
        _target(model, x, seed),
        reduction=reduction,
        sum_grad_squared=sum_grad_squared,
        chunk_elements=chunk_elements,
    )


@SETTINGS
@given(
    batch=st.integers(1, 4),
    vocab=st.integers(1, 6),
    dim=st.integers(1, 4),
    steps=st.one_of(st.none(), st.integers(1, 6)),
    padding=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
    sum_grad_squared=st.booleans(),
    data=st.data(),
)
def test_embedding_property(
    batch, vocab, dim, steps, padding, reduction, sum_grad_squared, data
) -> None:
    seed = data.draw(st.integers(0, 2**16))
    padding_idx = data.draw(st.integers(-vocab, vocab - 1)) if padding else None
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(vocab, dim, padding_idx=padding_idx), nn.Tanh()).double()
    shape = (batch,) if steps is None else (batch, steps)
    idx = torch.randint(0, vocab, shape)  # small vocabularies: many repeated indices
    assert_matches_oracle(
        model,
        idx,
        _target(model, idx, seed),
        reduction=reduction,
        sum_grad_squared=sum_grad_squared,
    )


@SETTINGS
@given(
    batch=st.integers(1, 4),
    channels=st.sampled_from([2, 4, 6]),
    kind=st.sampled_from(["layer", "group", "rms"]),
    extra=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**16),
)
def test_norm_property(batch, channels, kind, extra, seed) -> None:
    torch.manual_seed(seed)
    if kind == "group":
        # A group holding a single value normalises to 0 whatever the input: skip that.
        assume(channels // 2 * math.prod(extra) > 1)
        norm: nn.Module = nn.GroupNorm(2, channels)
        shape = (batch, channels, *extra)
    elif kind == "layer":
        norm = nn.LayerNorm(channels)
        shape = (batch, *extra, channels)
    else:
        norm = nn.RMSNorm(channels)
        shape = (batch, *extra, channels)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    model = nn.Sequential(norm, nn.Tanh()).double()
    x = torch.randn(*shape, dtype=torch.float64)
    assert_matches_oracle(model, x, _target(model, x, seed))
