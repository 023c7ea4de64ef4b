"""The convolution rule's routes against the float64 oracle, each forced where the rule would
pick another (the benchmark-sized layers that pick them by default are too slow for tests)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_oracle
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_gradwatch.probe.rules import conv as conv_rule

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    # The fixture only sets a constant, the same for every generated input.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _force(monkeypatch: pytest.MonkeyPatch, mode: str, nd: int) -> None:
    """Every convolution takes route ``mode`` (see ``candidate_routes``), whatever the timings;
    ``"older"`` is the grouped backward (N-d) or the unfolded patches (1-D)."""
    route = ("grouped" if nd >= 2 else "unfold") if mode == "older" else mode
    monkeypatch.setattr(conv_rule.ROUTES, "forced", route)


def _target(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _per_dim(low: int, high: int) -> st.SearchStrategy[list[int]]:
    """One value per spatial dim, for up to three; a test keeps the first ``nd``."""
    return st.lists(st.integers(low, high), min_size=3, max_size=3)


_PADDINGS = st.sampled_from([0, 1, 2, "same", "valid"])


def _conv_and_input(
    nd: int,
    batch: int,
    size: tuple[int, ...] | list[int],
    groups: int,
    in_per_group: int,
    out_per_group: int,
    kernel: int | tuple[int, ...],
    **conv_kwargs: object,
) -> tuple[nn.Module, torch.Tensor]:
    """A float64 ``(conv, tanh)`` pair and a ``(batch, channels, *size)`` input for it."""
    conv = _CONV[nd](
        groups * in_per_group, groups * out_per_group, kernel, groups=groups, **conv_kwargs
    )
    model = nn.Sequential(conv, nn.Tanh()).double()
    return model, torch.randn(batch, groups * in_per_group, *size, dtype=torch.float64)


def _geometry(
    nd: int,
    kernel: list[int],
    stride: list[int],
    dilation: list[int],
    size: list[int],
    padding: int | str,
    padding_mode: str,
) -> tuple[list[int], list[int], list[int], list[int]]:
    """The first ``nd`` entries of each list (stride 1 with ``padding="same"``, which torch
    requires), assuming away inputs too small for the kernel or for the padding mode."""
    kernel, stride, dilation, size = kernel[:nd], stride[:nd], dilation[:nd], size[:nd]
    if padding == "same":
        stride = [1] * nd
    for k, dl, n in zip(kernel, dilation, size, strict=True):
        span = dl * (k - 1) + 1
        pad = span // 2 + 1 if padding == "same" else (padding if isinstance(padding, int) else 0)
        assume(n + 2 * pad >= span)
        assume(padding_mode != "reflect" or pad < n)
        assume(padding_mode != "circular" or pad <= n)
    return kernel, stride, dilation, size


class _Twice(nn.Module):
    """One convolution called twice in one forward."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.tanh(self.conv(x)))


@SETTINGS
@given(
    mode=st.sampled_from(["windows", "gram", "offsets", "older"]),
    nd=st.integers(1, 3),
    batch=st.integers(1, 3),
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 2),
    out_per_group=st.integers(1, 3),
    kernel=_per_dim(1, 3),
    stride=_per_dim(1, 3),
    dilation=_per_dim(1, 2),
    padding=_PADDINGS,
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    size=_per_dim(1, 7),
    bias=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
    sum_grad_squared=st.booleans(),
    chunk_elements=st.sampled_from([1, 7, 2**24]),
    seed=st.integers(0, 2**16),
)
def test_conv_routes_property(
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    nd: int,
    batch: int,
    groups: int,
    in_per_group: int,
    out_per_group: int,
    kernel: list[int],
    stride: list[int],
    dilation: list[int],
    padding: int | str,
    padding_mode: str,
    size: list[int],
    bias: bool,
    reduction: str,
    sum_grad_squared: bool,
    chunk_elements: int,
    seed: int,
) -> None:
    if nd == 3:
        size = [min(n, 4) for n in size]
    kernel, stride, dilation, size = _geometry(
        nd, kernel, stride, dilation, size, padding, padding_mode
    )
    _force(monkeypatch, mode, nd)
    torch.manual_seed(seed)
    model, x = _conv_and_input(
        nd,
        batch,
        size,
        groups,
        in_per_group,
        out_per_group,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=bias,
        padding_mode=padding_mode,
    )
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
    nd=st.integers(1, 3),
    batch=st.integers(1, 4),
    groups=st.integers(1, 2),
    # 8: a 1-D layer that wide fills its buffer one offset at a time (PER_OFFSET_MIN_CHANNELS).
    in_per_group=st.sampled_from([1, 2, 3, 8]),
    kernel=_per_dim(1, 3),
    stride=_per_dim(1, 2),
    dilation=_per_dim(1, 2),
    padding=_PADDINGS,
    padding_mode=st.sampled_from(["zeros", "zeros", "reflect"]),
    size=_per_dim(2, 6),
    sum_grad_squared=st.booleans(),
    bound=st.sampled_from([100, 2**16]),
    seed=st.integers(0, 2**16),
)
def test_windows_route_fills_property(
    monkeypatch: pytest.MonkeyPatch,
    nd: int,
    batch: int,
    groups: int,
    in_per_group: int,
    kernel: list[int],
    stride: list[int],
    dilation: list[int],
    padding: int | str,
    padding_mode: str,
    size: list[int],
    sum_grad_squared: bool,
    bound: int,
    seed: int,
) -> None:
    """The windows route's three ways of filling its patch buffer (every window in one copy,
    zero-bordered chunks, one copy per offset), each against the oracle, from kept workspaces
    that hold NaN beforehand, large enough for the whole batch or for a few samples (or fewer:
    then allocated afresh)."""
    from lightning_gradwatch.probe import _conv_windows

    assert _conv_windows.PER_OFFSET_MIN_CHANNELS == 8
    kernel, stride, dilation, size = _geometry(
        nd, kernel, stride, dilation, size, padding, padding_mode
    )
    monkeypatch.setattr(_conv_windows, "WINDOW_CHUNK_ELEMENTS", bound)
    monkeypatch.setattr(conv_rule.ROUTES, "forced", "windows")
    # Kept workspaces full of NaN: a position the fill leaves unwritten shows in the result.
    nan = torch.full((bound,), float("nan"), dtype=torch.float64)
    names = ("inputs", "products", "padded")
    kept = {(name, torch.device("cpu"), torch.float64): nan.clone() for name in names}
    monkeypatch.setattr(_conv_windows._WORKSPACES, "buffers", kept, raising=False)
    torch.manual_seed(seed)
    model, x = _conv_and_input(
        nd,
        batch,
        size,
        groups,
        in_per_group,
        2,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        padding_mode=padding_mode,
    )
    assert_matches_oracle(
        model, x, _target(model, x, seed), sum_grad_squared=sum_grad_squared, chunk_elements=2**24
    )


@pytest.mark.parametrize("sum_grad_squared", [False, True])
def test_offset_route_on_a_wide_strided_layer(sum_grad_squared: bool) -> None:
    """A thin layer (2 input channels, no per-offset candidate) and a wide strided one (16,
    stride 2) in one model, through the timed steps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(16, 16, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16 * 5, 3),
    ).double()
    assert model[0].in_channels < conv_rule.OFFSET_MIN_CHANNELS <= model[2].in_channels
    x = torch.randn(5, 2, 10, dtype=torch.float64)
    assert_matches_oracle(
        model, x, _target(model, x, 1), sum_grad_squared=sum_grad_squared, chunk_elements=300
    )


def test_two_calls_of_one_convolution() -> None:
    """Two calls of one convolution add their gradients before the norm: the unfolded route
    handles that, and its numbers still match the oracle."""
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 3, 3, padding=1).double()
    model = _Twice(conv)
    x = torch.randn(4, 3, 9, dtype=torch.float64)
    assert_matches_oracle(model, x, _target(model, x, 2))


@pytest.mark.parametrize("bound", [1, 40, 2**18])
@pytest.mark.parametrize("sum_grad_squared", [False, True])
def test_windows_route_within_and_beyond_its_workspace(
    monkeypatch: pytest.MonkeyPatch, bound: int, sum_grad_squared: bool
) -> None:
    """Chunks within the kept workspace and chunks of one sample over it (formed fresh) give
    the oracle's numbers, on windows that read zero padding at both ends (stride, dilation)."""
    from lightning_gradwatch.probe import _conv_windows

    monkeypatch.setattr(_conv_windows, "WINDOW_CHUNK_ELEMENTS", bound)
    monkeypatch.setattr(conv_rule.ROUTES, "forced", "windows")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(3, 1), dilation=(2, 3), groups=2),
        nn.Tanh(),
    ).double()
    x = torch.randn(5, 4, 6, 5, dtype=torch.float64)
    for _ in range(2):  # the second step reuses the workspace
        assert_matches_oracle(
            model, x, _target(model, x, 3), sum_grad_squared=sum_grad_squared, chunk_elements=200
        )


@SETTINGS
@given(
    batch=st.integers(1, 3),
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, 3, "same", "valid"]),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    size=st.integers(1, 9),
    bias=st.booleans(),
    chunk_elements=st.sampled_from([1, 50, 2**24]),
    seed=st.integers(0, 2**16),
)
def test_gram_route_property(
    monkeypatch: pytest.MonkeyPatch,
    batch: int,
    groups: int,
    in_per_group: int,
    out_per_group: int,
    kernel: int,
    stride: int,
    dilation: int,
    padding: int | str,
    padding_mode: str,
    size: int,
    bias: bool,
    chunk_elements: int,
    seed: int,
) -> None:
    """The Gram form of a 1-D convolution's norms (with the dot from its output)."""
    if padding == "same":
        stride = 1
    span = dilation * (kernel - 1) + 1
    pad = span // 2 + 1 if padding == "same" else (padding if isinstance(padding, int) else 0)
    assume(size + 2 * pad >= span)
    assume(padding_mode != "reflect" or pad < size)
    assume(padding_mode != "circular" or pad <= size)
    monkeypatch.setattr(conv_rule.ROUTES, "forced", "gram")
    torch.manual_seed(seed)
    model, x = _conv_and_input(
        1,
        batch,
        (size,),
        groups,
        in_per_group,
        out_per_group,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=bias,
        padding_mode=padding_mode,
    )
    assert_matches_oracle(model, x, _target(model, x, seed), chunk_elements=chunk_elements)


@pytest.mark.parametrize("route", ["windows", "gram", "offsets", "older"])
def test_routes_on_inputs_that_are_not_contiguous(
    monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """A channels-last 2-D input and a transposed 1-D one (their channels cannot be split
    into groups by a view of the memory order the routes assume), to padded layers and to
    layers without padding (whose windows the windows route copies at once)."""
    torch.manual_seed(0)
    cases = [
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), torch.randn(3, 4, 7, 6)),
        (nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), torch.randn(3, 7, 4)),
        (nn.Conv2d(4, 6, 3, dilation=(1, 2), groups=2), torch.randn(3, 4, 7, 6)),
        (nn.Conv1d(4, 6, 3, stride=2, groups=2), torch.randn(3, 7, 4)),
    ]
    for conv, x in cases:
        _force(monkeypatch, route, conv.weight.dim() - 2)
        model = nn.Sequential(conv, nn.Tanh()).double()
        x = x.double()
        x = x.to(memory_format=torch.channels_last) if x.dim() == 4 else x.transpose(1, 2)
        assert not x.is_contiguous()
        assert_matches_oracle(model, x, _target(model, x, 4), sum_grad_squared=route != "gram")


@pytest.fixture
def kept_outputs(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For every convolution call the rule computes, in order: whether its output was kept."""
    seen: list[bool] = []
    original = conv_rule.ConvRule.compute

    def spy(self: conv_rule.ConvRule, module: nn.Module, calls: list, ctx: object) -> object:
        seen.extend(call.outputs[0] is not None for call in calls)
        return original(self, module, calls, ctx)

    monkeypatch.setattr(conv_rule.ConvRule, "compute", spy)
    return seen


@pytest.mark.parametrize(
    ("mode", "nd"),
    [("windows", 1), ("gram", 1), ("offsets", 1), ("older", 1), ("windows", 2), ("older", 2)],
)
def test_output_kept_only_for_routes_that_read_it(
    monkeypatch: pytest.MonkeyPatch, kept_outputs: list[bool], mode: str, nd: int
) -> None:
    """The windows and grouped routes take ``<G_i, W>`` from the per-sample gradients they
    form, so the probe keeps no output for them; the others read it. Exact either way."""
    _force(monkeypatch, mode, nd)
    torch.manual_seed(1)
    conv = _CONV[nd](8, 6, 3, stride=2, padding=1).double()
    x = torch.randn(3, 8, *([7] * nd), dtype=torch.float64)
    for sum_sq in (False, True):
        kept_outputs.clear()
        assert_matches_oracle(conv, x, _target(conv, x, 3), sum_grad_squared=sum_sq)
        reads = conv_rule.ROUTES.forced not in conv_rule.FORMS_GRADIENTS
        assert kept_outputs == [reads]


def test_two_calls_without_kept_outputs(
    monkeypatch: pytest.MonkeyPatch, kept_outputs: list[bool]
) -> None:
    """A 1-D convolution called twice takes the unfolded route, which reads ``z - b``: where
    the windows route dropped the outputs at the forward, it recomputes them, exactly."""
    monkeypatch.setattr(conv_rule.ROUTES, "forced", "windows")
    torch.manual_seed(2)
    conv = nn.Conv1d(3, 3, 3, padding=1, padding_mode="circular").double()
    model = _Twice(conv)
    x = torch.randn(4, 3, 9, dtype=torch.float64)
    assert_matches_oracle(model, x, _target(model, x, 4))
    assert kept_outputs == [False, False]


def test_outputs_dropped_once_timing_keeps_such_a_route(
    monkeypatch: pytest.MonkeyPatch, kept_outputs: list[bool]
) -> None:
    """Unforced, on the CPU: outputs are kept while the routes are timed, and dropped from the
    step after the route kept for that input shape forms per-sample gradients; the statistics
    of such a later step still match the oracle."""
    from lightning_gradwatch import GradientProbe
    from lightning_gradwatch.probe.route_timing import RouteTimer

    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    target = _target(conv, x, 5)
    timer = RouteTimer()
    monkeypatch.setattr(conv_rule, "ROUTES", timer)
    probe = GradientProbe(conv, verify="never")
    steps = 0
    while not timer.settled(conv):
        with probe:
            (conv(x) - target).pow(2).flatten(1).sum(1).mean().backward()
        steps += 1
        assert steps < 20
    assert all(kept_outputs)  # kept while timing
    (chosen,) = timer.settled(conv).values()
    kept_outputs.clear()
    assert_matches_oracle(conv, x, target, sum_grad_squared=False)
    assert kept_outputs == [chosen not in conv_rule.FORMS_GRADIENTS]
