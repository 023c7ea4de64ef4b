"""nn.RNN, nn.GRU and nn.LSTM against the float64 per-sample oracle (rtol=1e-6).

Every model takes batch-first ``(B, T, F)`` input (transposed inside for
``batch_first=False``), so that the model's batch is dim 0 of its input whichever layout the
recurrent layer uses.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_oracle, run_probe, squared_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientProbe, GradientSNR
from lightning_gradwatch.probe.registry import rule_for
from lightning_gradwatch.probe.rules.recurrent import RecurrentCellRule

_KINDS = {
    "rnn_tanh": lambda **kw: nn.RNN(nonlinearity="tanh", **kw),
    "rnn_relu": lambda **kw: nn.RNN(nonlinearity="relu", **kw),
    "gru": lambda **kw: nn.GRU(**kw),
    "lstm": lambda **kw: nn.LSTM(**kw),
}


class _Sequence(nn.Module):
    """A recurrent layer whose selected results feed a per-sample output ``(B, F)``.

    Args:
        rnn: the recurrent layer.
        use: which of ``"output"``, ``"h_n"``, ``"c_n"`` reach the loss.
        initial_state: ``"none"``, or ``"computed"`` (``h0``/``c0`` from a Linear of the
            sample's mean input, so each sample starts from its own state).
        packed: feed a ``PackedSequence``; the model then takes ``(x, lengths)``.
    """

    def __init__(
        self,
        rnn: nn.RNNBase,
        use: tuple[str, ...] = ("output",),
        initial_state: str = "none",
        packed: bool = False,
    ) -> None:
        super().__init__()
        self.rnn = rnn
        self.use = use
        self.packed = packed
        self.initial_state = initial_state
        directions = 2 if rnn.bidirectional else 1
        self.layers = rnn.num_layers * directions
        proj = getattr(rnn, "proj_size", 0)
        self.h_size = proj if proj > 0 else rnn.hidden_size
        if initial_state == "computed":
            self.init_h = nn.Linear(rnn.input_size, self.layers * self.h_size)
            if isinstance(rnn, nn.LSTM):
                self.init_c = nn.Linear(rnn.input_size, self.layers * rnn.hidden_size)

    def forward(self, inputs: Any) -> Tensor:
        x, lengths = inputs if self.packed else (inputs, None)
        batch = x.shape[0]
        hx = None
        if self.initial_state == "computed":
            mean = x.mean(1)
            h0 = torch.tanh(self.init_h(mean)).reshape(batch, self.layers, -1).transpose(0, 1)
            hx = h0.contiguous()
            if isinstance(self.rnn, nn.LSTM):
                c0 = self.init_c(mean).reshape(batch, self.layers, -1).transpose(0, 1)
                hx = (hx, c0.contiguous())
        seq = x if self.rnn.batch_first else x.transpose(0, 1)
        if lengths is not None:
            # Sorted lengths are packed with enforce_sorted=True (no permutation indices).
            in_order = bool((lengths[:-1] >= lengths[1:]).all())
            seq = pack_padded_sequence(
                seq, lengths, batch_first=self.rnn.batch_first, enforce_sorted=in_order
            )
        output, state = self.rnn(seq, hx)
        if lengths is not None:
            output, _ = pad_packed_sequence(output, batch_first=self.rnn.batch_first)
        if not self.rnn.batch_first:
            output = output.transpose(0, 1)
        h_n, c_n = state if isinstance(state, tuple) else (state, None)
        pieces = {
            "output": output.flatten(1),
            "h_n": h_n.transpose(0, 1).flatten(1),
            "c_n": c_n.transpose(0, 1).flatten(1) if c_n is not None else None,
        }
        return torch.cat([pieces[k] for k in self.use], 1)


def _model(kind: str, seed: int = 0, **kwargs: Any) -> tuple[nn.Module, Any, Tensor]:
    """A float64 model, its input (``(B, T, F)``, or ``(x, lengths)`` when ``lengths`` is
    given: a ``PackedSequence`` of those lengths) and a target."""
    use = kwargs.pop("use", ("output",))
    initial_state = kwargs.pop("initial_state", "none")
    batch = kwargs.pop("batch", 3)
    steps = kwargs.pop("steps", 4)
    lengths = kwargs.pop("lengths", None)
    torch.manual_seed(seed)
    kwargs.setdefault("input_size", 3)
    kwargs.setdefault("hidden_size", 4)
    rnn = _KINDS[kind](**kwargs)
    model = _Sequence(rnn, use, initial_state, packed=lengths is not None).double()
    x = torch.randn(batch, steps, kwargs["input_size"], dtype=torch.float64)
    if lengths is not None:
        x = (x, torch.tensor(lengths))
    with torch.no_grad():
        target = torch.randn_like(model(x))
    return model, x, target


_USES = [("output",), ("h_n",), ("output", "h_n")]
_LSTM_USES = [*_USES, ("c_n",), ("h_n", "c_n"), ("output", "h_n", "c_n")]


# --------------------------------------------------------------------------- option matrix
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", list(_KINDS))
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"batch_first": True},
        {"num_layers": 2},
        {"bidirectional": True},
        {"bias": False},
        {"initial_state": "computed"},
        {"num_layers": 3, "bidirectional": True, "batch_first": True, "use": ("output", "h_n")},
        {"num_layers": 2, "bias": False, "initial_state": "computed", "use": ("h_n",)},
    ],
    ids=["plain", "batch_first", "layers2", "bidir", "nobias", "h0", "deep_bidir", "mixed"],
)
def test_recurrent_options(kind: str, options: dict[str, Any], reduction: str) -> None:
    model, x, target = _model(kind, **dict(options))
    assert_matches_oracle(model, x, target, reduction=reduction)


@pytest.mark.parametrize("steps", [1, 2, 6])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_norm_routes_without_sum_sq(kind: str, steps: int) -> None:
    """Without ``sum_grad_squared`` the weights take the cheapest route by ``T``: the ghost
    norm (``T = 1``), the Gram form (``T = 2`` here) or materialisation (``T = 6``)."""
    model, x, target = _model(kind, steps=steps, num_layers=2, bidirectional=True)
    assert_matches_oracle(model, x, target, sum_grad_squared=False)


@pytest.mark.parametrize("sum_grad_squared", [False, True])
def test_chunked_over_samples(sum_grad_squared: bool) -> None:
    model, x, target = _model("lstm", batch=5, steps=6, proj_size=2, initial_state="computed")
    assert_matches_oracle(model, x, target, sum_grad_squared=sum_grad_squared, chunk_elements=40)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("use", _LSTM_USES, ids=lambda u: "+".join(u))
def test_lstm_outputs_in_any_combination(use: tuple[str, ...], reduction: str) -> None:
    model, x, target = _model("lstm", use=use, num_layers=2, initial_state="computed")
    assert_matches_oracle(model, x, target, reduction=reduction)


@pytest.mark.parametrize("use", _USES, ids=lambda u: "+".join(u))
@pytest.mark.parametrize("kind", ["gru", "rnn_tanh"])
def test_gru_rnn_outputs(kind: str, use: tuple[str, ...]) -> None:
    model, x, target = _model(kind, use=use, num_layers=2, bidirectional=True)
    assert_matches_oracle(model, x, target)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "options",
    [{}, {"num_layers": 2, "bidirectional": True}, {"batch_first": True, "bias": False}],
    ids=["plain", "deep_bidir", "batch_first_nobias"],
)
def test_lstm_projection(options: dict[str, Any], reduction: str) -> None:
    model, x, target = _model(
        "lstm", proj_size=2, use=("output", "h_n", "c_n"), initial_state="computed", **options
    )
    assert any("weight_hr" in n for n, _ in model.named_parameters())
    assert_matches_oracle(model, x, target, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", list(_KINDS))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("sorted_lengths", [False, True], ids=["unsorted", "sorted"])
def test_packed_sequence(
    kind: str, batch_first: bool, sorted_lengths: bool, reduction: str
) -> None:
    torch.manual_seed(1)
    rnn = _KINDS[kind](
        input_size=3, hidden_size=4, num_layers=2, bidirectional=True, batch_first=batch_first
    )
    use = ("output", "h_n", "c_n") if kind == "lstm" else ("output", "h_n")
    model = _Sequence(rnn, use, initial_state="computed", packed=True).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    lengths = torch.tensor([3, 5, 1, 4])  # unsorted: the module permutes internally
    if sorted_lengths:
        lengths = lengths.sort(descending=True).values
    with torch.no_grad():
        target = torch.randn_like(model((x, lengths)))
    assert_matches_oracle(model, (x, lengths), target, reduction=reduction)


def test_module_called_twice() -> None:
    """A shared encoder over two sequences: per-sample gradients add over the calls."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(3, 4, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            a, _ = self.rnn(x)
            b, (h, _) = self.rnn(x.flip(1) * 0.5)
            return torch.cat([a.flatten(1), (b * h.transpose(0, 1)).flatten(1)], 1)

    torch.manual_seed(2)
    model = Twice().double()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    assert_matches_oracle(model, x, target)


def test_tied_with_another_module() -> None:
    """One Parameter owned by the LSTM and a Linear: per-sample gradients are summed first."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(4, 4, batch_first=True)
            self.mix = nn.Linear(4, 12, bias=False)
            self.mix.weight = self.rnn.weight_ih_l0

        def forward(self, x: Tensor) -> Tensor:
            out, _ = self.rnn(x)
            return torch.cat([out.flatten(1), self.mix(x[:, 0])], 1)

    torch.manual_seed(3)
    model = Tied().double()
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    assert_matches_oracle(model, x, target)


@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_lstm_projection(batch_first: bool) -> None:
    torch.manual_seed(4)
    rnn = nn.LSTM(3, 4, proj_size=2, num_layers=2, bidirectional=True, batch_first=batch_first)
    model = _Sequence(rnn, ("output", "h_n", "c_n"), initial_state="computed", packed=True)
    model = model.double()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([2, 4, 3])
    with torch.no_grad():
        target = torch.randn_like(model((x, lengths)))
    assert_matches_oracle(model, (x, lengths), target)


@pytest.mark.parametrize("batch_first", [False, True])
def test_keyword_state_and_outputs_modified_in_place(batch_first: bool) -> None:
    """``hx=`` as a keyword, and ReLU applied in place to ``output`` and ``h_n`` afterwards."""

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.init = nn.Linear(3, 2 * 4)
            self.rnn = nn.GRU(3, 4, num_layers=2, batch_first=batch_first)

        def forward(self, x: Tensor) -> Tensor:
            h0 = self.init(x[:, 0]).reshape(-1, 2, 4).transpose(0, 1).contiguous()
            seq = x if batch_first else x.transpose(0, 1)
            out, h_n = self.rnn(input=seq, hx=h0)
            out, h_n = torch.relu_(out), torch.relu_(h_n)
            out = out if batch_first else out.transpose(0, 1)
            return torch.cat([out.flatten(1), h_n.transpose(0, 1).flatten(1)], 1)

    torch.manual_seed(5)
    model = InPlace().double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    assert_matches_oracle(model, x, target)


def test_parametrized_weight_leaves_the_others_exact() -> None:
    """``weight_hh_l0`` under a parametrization: the LSTM's own parameters stay exact."""

    class Symmetric(nn.Module):
        def forward(self, w: Tensor) -> Tensor:
            return w + 0.5 * w.flip(0)

    model, x, target = _model("lstm", num_layers=2)
    torch.nn.utils.parametrize.register_parametrization(model.rnn, "weight_hh_l0", Symmetric())
    own = [f"rnn.{n}" for n, p in model.rnn.named_parameters(recurse=False)]
    assert "rnn.weight_hh_l0" not in own and "rnn.weight_hh_l1" in own
    with torch.no_grad():
        target = torch.randn_like(model(x))
    assert_matches_oracle(model, x, target, params=own)


def test_subset_of_parameters() -> None:
    model, x, target = _model("lstm", num_layers=2, bidirectional=True)
    names = ["rnn.weight_hh_l1_reverse", "rnn.bias_ih_l0"]
    assert_matches_oracle(model, x, target, params=names)


def test_eval_mode_dropout_is_exact() -> None:
    model, x, target = _model("gru", num_layers=2, dropout=0.5)
    model.eval()
    assert_matches_oracle(model, x, target)


def test_float32_matches_same_precision_oracle() -> None:
    """Float32 model: the replay runs in float32 too, against a float32 brute force.

    The replay (explicit cell formulas) and the fused kernel round differently, and the
    difference passes through every step of the recurrence: measured up to 2e-6 of the largest
    entry (about 16 float32 eps) over 5 seeds. Small entries carry the same absolute rounding,
    so per element the tolerance is rtol=1e-4.
    """
    model, x, target = _model("lstm", num_layers=2, bidirectional=True, initial_state="computed")
    model, x, target = model.float(), x.float(), target.float()
    assert_matches_oracle(model, x, target, rtol=1e-4)


# --------------------------------------------------------------------------- cells
_CELLS = {
    "rnn_cell_tanh": lambda **kw: nn.RNNCell(nonlinearity="tanh", **kw),
    "rnn_cell_relu": lambda **kw: nn.RNNCell(nonlinearity="relu", **kw),
    "gru_cell": lambda **kw: nn.GRUCell(**kw),
    "lstm_cell": lambda **kw: nn.LSTMCell(**kw),
}


class _CellLoop(nn.Module):
    """A cell driven over the steps of ``(B, T, F)`` by a Python loop, as in a decoder."""

    def __init__(self, cell: nn.RNNCellBase, initial_state: bool, every_step: bool) -> None:
        super().__init__()
        self.cell = cell
        self.init = nn.Linear(cell.input_size, cell.hidden_size) if initial_state else None
        self.every_step = every_step

    def forward(self, x: Tensor) -> Tensor:
        lstm = isinstance(self.cell, nn.LSTMCell)
        state: Any = None
        if self.init is not None:
            h0 = torch.tanh(self.init(x[:, 0]))
            state = (h0, -h0) if lstm else h0
        seen = []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            seen.append(state[0] if lstm else state)
        if lstm:
            seen.append(state[1])
        return torch.cat(seen if self.every_step else seen[-2:], 1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", list(_CELLS))
@pytest.mark.parametrize(
    ("steps", "bias", "initial_state", "every_step"),
    [
        (1, True, False, True),
        (4, True, True, True),
        (4, False, False, False),
        (3, True, True, False),
    ],
    ids=["one_step", "h0_every_step", "nobias_last", "h0_last"],
)
def test_cell_loop(
    kind: str, steps: int, bias: bool, initial_state: bool, every_step: bool, reduction: str
) -> None:
    torch.manual_seed(6)
    model = _CellLoop(
        _CELLS[kind](input_size=3, hidden_size=4, bias=bias), initial_state, every_step
    )
    model = model.double()
    x = torch.randn(3, steps, 3, dtype=torch.float64)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    assert_matches_oracle(model, x, target, reduction=reduction)


@pytest.mark.parametrize("sum_grad_squared", [False, True])
def test_cell_loop_norm_routes(sum_grad_squared: bool) -> None:
    torch.manual_seed(7)
    for steps in (2, 7):  # Gram form, then materialised, without sum_sq
        model = _CellLoop(nn.LSTMCell(3, 4), initial_state=True, every_step=True).double()
        x = torch.randn(3, steps, 3, dtype=torch.float64)
        with torch.no_grad():
            target = torch.randn_like(model(x))
        assert_matches_oracle(model, x, target, sum_grad_squared=sum_grad_squared)


class _FusedLSTMCell(torch.autograd.Function):
    """PyTorch's LSTM cell as one autograd node returning ``(h', c')``, as the fused CUDA
    kernel does: ``c'``'s gradient is then its own only, not the part through ``h'``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, h: Tensor, c: Tensor, *weights: Tensor) -> Any:
        ctx.save_for_backward(x, h, c, *weights)
        return _COMPOSITE_LSTM_CELL(x, (h, c), *weights)

    @staticmethod
    def backward(ctx: Any, grad_h: Tensor, grad_c: Tensor) -> Any:
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            outputs = _COMPOSITE_LSTM_CELL(inputs[0], (inputs[1], inputs[2]), *inputs[3:])
        return torch.autograd.grad(outputs, inputs, (grad_h, grad_c))


_COMPOSITE_LSTM_CELL = torch.lstm_cell


def _fused_lstm_cell(x: Tensor, hx: tuple[Tensor, Tensor], *weights: Tensor) -> Any:
    return _FusedLSTMCell.apply(x, hx[0], hx[1], *weights)


@pytest.mark.parametrize("every_step", [False, True])
def test_lstm_cell_with_a_fused_kernel(monkeypatch: pytest.MonkeyPatch, every_step: bool) -> None:
    """The cell rule asks the kernel whether ``c'`` carries ``h'``'s gradient; with a fused
    kernel (simulated here on the CPU) it does not, and the result is exact too."""
    rule = rule_for(nn.LSTMCell(1, 1))
    assert isinstance(rule, RecurrentCellRule)
    monkeypatch.setattr(torch._VF, "lstm_cell", _fused_lstm_cell)
    monkeypatch.setattr(torch, "lstm_cell", _fused_lstm_cell)
    monkeypatch.setattr(rule, "_feeds", {})  # forget what the composite kernel answered
    torch.manual_seed(8)
    model = _CellLoop(nn.LSTMCell(3, 4), initial_state=True, every_step=every_step).double()
    x = torch.randn(3, 3, 3, dtype=torch.float64)
    h, c = model.cell(x[:, 0])
    assert h.grad_fn is c.grad_fn  # one node, as in a fused kernel
    with torch.no_grad():
        target = torch.randn_like(model(x))
    assert_matches_oracle(model, x, target)
    assert rule._feeds == {(x.device, x.dtype): False}


def test_unbatched_cell_input_is_refused() -> None:
    torch.manual_seed(0)
    cell = nn.GRUCell(3, 4).double()
    probe = GradientProbe(cell)
    with pytest.warns(UserWarning, match=r"unbatched \(H_in,\) step has no sample"), probe:
        cell(torch.randn(3, dtype=torch.float64)).pow(2).sum().backward()
    assert "weight_ih" in probe.stats.excluded and not probe.stats.dot


# --------------------------------------------------------------------------- hypothesis
@st.composite
def _configs(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "batch": draw(st.integers(1, 4)),
        "steps": draw(st.integers(1, 5)),
        "input_size": draw(st.integers(1, 4)),
        "hidden_size": draw(st.integers(1, 4)),
        "num_layers": draw(st.integers(1, 3)),
        "bidirectional": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "initial_state": draw(st.sampled_from(["none", "computed"])),
        "use": draw(st.sampled_from(_LSTM_USES if kind == "lstm" else _USES)),
    }
    if kind == "lstm" and config["hidden_size"] > 1 and draw(st.booleans()):
        config["proj_size"] = draw(st.integers(1, config["hidden_size"] - 1))
    if draw(st.booleans()):
        length = st.integers(1, config["steps"])
        config["lengths"] = draw(
            st.lists(length, min_size=config["batch"], max_size=config["batch"])
        )
    return config


_HYPOTHESIS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@_HYPOTHESIS
@given(config=_configs("lstm"), reduction=st.sampled_from(["mean", "sum"]))
def test_lstm_shapes(config: dict[str, Any], reduction: str) -> None:
    model, x, target = _model("lstm", **config)
    assert_matches_oracle(model, x, target, reduction=reduction)


@_HYPOTHESIS
@given(config=_configs("gru"), reduction=st.sampled_from(["mean", "sum"]))
def test_gru_shapes(config: dict[str, Any], reduction: str) -> None:
    model, x, target = _model("gru", **config)
    assert_matches_oracle(model, x, target, reduction=reduction)


# --------------------------------------------------------------------------- refusals
def test_training_dropout_is_refused() -> None:
    model, x, target = _model("lstm", num_layers=2, dropout=0.3, initial_state="computed")
    with pytest.warns(UserWarning, match=r"dropout=0.3 between layers in training mode"):
        stats = run_probe(model, x, target)
    assert all(n in stats.excluded for n, _ in model.rnn.named_parameters(prefix="rnn"))
    assert not any(n.startswith("rnn.") for n in stats.dot)
    assert "init_h.weight" in stats.dot
    assert "set dropout=0" in stats.excluded["rnn.weight_ih_l0"]


def test_unbatched_input_is_refused() -> None:
    torch.manual_seed(0)
    rnn = nn.GRU(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64)  # (T, H_in): one sequence, no sample dim
    probe = GradientProbe(rnn)
    with pytest.warns(UserWarning, match=r"unbatched \(T, H_in\) sequence has no sample"), probe:
        rnn(x)[0].pow(2).sum().backward()
    assert "weight_ih_l0" in probe.stats.excluded
    assert "add one" in probe.stats.excluded["weight_ih_l0"]
    assert not probe.stats.dot


def test_subclass_with_own_forward_is_not_replayed() -> None:
    """A subclass that changes the computation must not get nn.LSTM's replay."""

    class Scaled(nn.LSTM):
        def forward(self, x: Tensor, hx: Any = None) -> Any:  # type: ignore[override]
            out, state = super().forward(x * 2, hx)
            return out, state

    torch.manual_seed(0)
    model = _Sequence(Scaled(3, 4), initial_state="computed").double()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = run_probe(model, x, torch.zeros(3, 16, dtype=torch.float64))
    assert "init_h.weight" in stats.dot  # the rest of the model is still probed
    # Whichever rule sees it (this one refuses subclasses that override forward), the result
    # is an exclusion with a warning, never nn.LSTM's numbers.
    assert any("rnn" in str(w.message) for w in caught)
    assert not any(n.startswith("rnn.") for n in stats.dot)
    assert "rnn.weight_ih_l0" in stats.excluded


# --------------------------------------------------------------------------- training
def test_probe_does_not_change_training() -> None:
    def train(with_probe: bool) -> dict[str, Tensor]:
        torch.manual_seed(0)
        model = _Sequence(
            nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True),
            use=("output", "h_n", "c_n"),
            initial_state="computed",
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        probe = GradientProbe(model, sum_grad_squared=True)
        data = torch.randn(4, 6, 3, 3)
        for step in range(4):
            x = data[step]
            target = torch.zeros(6, model(x).shape[1])
            optimizer.zero_grad()
            if with_probe:
                with probe:
                    squared_error(model(x), target).mean().backward()
                assert probe.stats.sq_norm["rnn.weight_hh_l1_reverse"].shape == (6,)
            else:
                squared_error(model(x), target).mean().backward()
            optimizer.step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    plain, probed = train(False), train(True)
    for name, value in plain.items():
        assert torch.equal(value, probed[name]), name


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        _, (h_n, _) = self.lstm(x)
        return self.head(h_n[-1])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_gradient_snr_on_lstm_classifier(tmp_path: Any) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 5, 3), torch.arange(16) % 3)
    gsnr = GradientSNR()
    trainer = pl.Trainer(
        max_steps=2,
        log_every_n_steps=1,
        callbacks=[gsnr],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no logger.*")
        trainer.fit(_Classifier(), DataLoader(data, batch_size=4))
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        value = gsnr.latest[f"gsnr_layers/gsnr/lstm.{name}"]
        assert torch.isfinite(value) and value > 0, name
