"""``nn.RNN``/``GRU``/``LSTM`` and their cells: exact per-sample statistics by replay.

The fused recurrent kernel keeps its gates and cell states to itself, so the rule replays the
recurrence in the statistics dtype with PyTorch's cell formulas written out, keeping every
layer's matrix products as separate tensors: the input projection ``x_t W_ih^T + b_ih`` of
each layer and direction (all steps at once) and the hidden projection
``h_{t-1} W_hh^T + b_hh`` of each step (and ``m_t W_hr^T``, the LSTM projection). One
``autograd.grad`` of the replayed outputs against the captured output gradients gives the
backprop ``delta_t`` of every such product. Each weight's per-sample gradient is then
``sum_t delta_t a_t^T`` over the steps, exactly the shape of a Linear layer applied to a
sequence, and goes through the same routes (Gram form or chunked materialisation); each
bias's is ``sum_t delta_t``.

``PackedSequence`` inputs are replayed padded with a per-sample mask: a sample's state stops
changing after its last step (the reverse direction starts at its own last step), so padded
steps receive no backprop, as in the kernel.

``nn.RNNCell``, ``nn.GRUCell`` and ``nn.LSTMCell`` are the one-step case: each call is
replayed from its captured input and state, and a cell called in a loop adds its calls' outer
products, as a layer adds its steps'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .._linalg import outer_product_moments, stats_from_grad_sample
from ..registry import Call, LayerRule, ParamStats, RuleContext, SkipModule, register_rule


@dataclass
class _Products:
    """The tensors of one matrix product ``z_t = a_t W^T (+ b)`` over the replayed steps.

    ``inputs`` and ``outputs`` are ``(T, B, K)`` and ``(T, B, O)`` (stacked over steps), or
    lists of ``T`` tensors ``(B, K)``/``(B, O)`` for the recurrent products, which are formed
    one step at a time.
    """

    weight: str
    bias: str | None
    inputs: Tensor | list[Tensor]
    outputs: Tensor | list[Tensor]


@dataclass
class _Pieces:
    """What one parameter collected over every call of the module (summed at the end)."""

    a: list[Tensor] = field(default_factory=list)  # (B, T, K) per call
    delta: list[Tensor] = field(default_factory=list)  # (B, T, O) per call
    dot: list[Tensor] = field(default_factory=list)  # (B,) per call


class _ReplayRule(LayerRule):
    """Shared by the layer and cell rules: replay each call, then sum its products' outer
    products over calls (one call per step for a cell driven by a Python loop)."""

    def _replay_call(
        self,
        module: nn.Module,
        call: Call,
        ctx: RuleContext,
        pieces: dict[str, _Pieces],
        bias_pieces: dict[str, list[Tensor]],
    ) -> int | None:
        """Replay one call, add its per-parameter pieces; returns its number of samples."""
        raise NotImplementedError

    def compute(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats]:
        pieces: dict[str, _Pieces] = {}
        bias_pieces: dict[str, list[Tensor]] = {}
        batch: int | None = None
        for call in calls:
            call_batch = self._replay_call(module, call, ctx, pieces, bias_pieces)
            if call_batch is None:
                continue
            if batch is not None and call_batch != batch:
                raise SkipModule(
                    f"its calls in one forward saw different numbers of samples "
                    f"({batch} and {call_batch})"
                )
            batch = call_batch

        out: dict[str, ParamStats] = {}
        for name, piece in pieces.items():
            # Calls of one module in one forward add their outer products: concatenate steps.
            a = torch.cat(piece.a, 1) if len(piece.a) > 1 else piece.a[0]
            delta = torch.cat(piece.delta, 1) if len(piece.delta) > 1 else piece.delta[0]
            keep = name in ctx.need_grad_sample
            # With sum_sq, sum_i G_i comes from the same per-sample terms (a reduction where
            # they are materialised anyway), so that the variance sum_sq/B - (grad_sum/B)**2
            # does not cancel against a 16-bit .grad; not formed when autograd's batch
            # gradient is exact (ctx.need_grad_sum).
            sq_norm, sum_sq, grad_sample, grad_sum = outer_product_moments(
                a.unsqueeze(2),
                delta.unsqueeze(2),
                ctx.need_sum_sq,
                keep,
                ctx.chunk_elements,
                need_sum=ctx.need_grad_sum,
            )
            shape = getattr(module, name).shape
            out[name] = ParamStats(
                dot=torch.stack(piece.dot).sum(0),
                sq_norm=sq_norm,
                sum_sq=sum_sq.reshape(shape) if sum_sq is not None else None,
                grad_sample=grad_sample.reshape(-1, *shape) if grad_sample is not None else None,
                grad_sum=grad_sum.reshape(shape) if grad_sum is not None else None,
            )
        for name, grads in bias_pieces.items():
            out[name] = stats_from_grad_sample(
                torch.stack(grads).sum(0),
                getattr(module, name).detach().to(ctx.dtype),
                ctx.need_sum_sq,
                name in ctx.need_grad_sample,
            )
        return out


@register_rule(nn.RNN, nn.GRU, nn.LSTM)
class RecurrentRule(_ReplayRule):
    """Exact per-sample statistics for every weight and bias of ``nn.RNN``/``GRU``/``LSTM``."""

    def native_batch_dim(self, module: nn.Module) -> int | None:
        return 0 if module.batch_first else 1

    def check(self, module: nn.Module) -> str | None:
        base = next(k for k in (nn.RNN, nn.GRU, nn.LSTM) if isinstance(module, k))
        if type(module).forward is not base.forward:
            return (
                f"it overrides the forward of nn.{base.__name__}, so the rule's replay of "
                f"nn.{base.__name__}'s recurrence would not be its computation; give it a rule "
                f"of its own, or call a plain nn.{base.__name__} inside it"
            )
        assert isinstance(module, nn.RNNBase)
        if module.training and module.dropout > 0 and module.num_layers > 1:
            return (
                f"dropout={module.dropout} between layers in training mode draws its masks "
                "inside the fused kernel, where they cannot be replayed per sample; set "
                "dropout=0 (apply nn.Dropout between single-layer modules instead) or watch "
                "other parameters"
            )
        return None

    # ------------------------------------------------------------------ one call
    def _replay_call(
        self,
        module: nn.Module,
        call: Call,
        ctx: RuleContext,
        pieces: dict[str, _Pieces],
        bias_pieces: dict[str, list[Tensor]],
    ) -> int | None:
        assert isinstance(module, nn.RNNBase)
        # The flattened outputs are (output, h_n[, c_n]), or (data, batch_sizes, [indices,]
        # h_n[, c_n]) for a PackedSequence: the output first, the states last.
        n_states = 2 if module.mode == "LSTM" else 1
        grad_out = call.grads[0]
        grad_states = call.grads[len(call.grads) - n_states :]

        x = call.args[0] if call.args else call.kwargs.get("input")
        hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
        lengths: Tensor | None = None
        if isinstance(x, PackedSequence):
            # Padded, time-major, in the caller's sample order (hx and h_n are in that order).
            padded, lengths = pad_packed_sequence(x)
            if grad_out is not None:
                grad_out, _ = pad_packed_sequence(
                    PackedSequence(grad_out, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
                )
            x = padded
        elif x.dim() != 3:
            raise SkipModule(
                f"its input has {x.dim()} dims; an unbatched (T, H_in) sequence has no sample "
                "dimension: add one (x.unsqueeze(0) with batch_first=True)"
            )
        elif module.batch_first:
            x = x.transpose(0, 1)
            if grad_out is not None:
                grad_out = grad_out.transpose(0, 1)
        steps, batch = x.shape[0], x.shape[1]
        if steps == 0 or batch == 0:
            return None

        dtype, device = ctx.dtype, x.device
        h0, c0 = self._initial_state(module, hx, batch, dtype, device)
        mask = None
        if lengths is not None:
            time = torch.arange(steps, device=device)[:, None]
            mask = (time < lengths.to(device)[None, :]).unsqueeze(-1)  # (T, B, 1)

        with torch.enable_grad():
            products, outputs = self._replay(module, x.to(dtype), h0, c0, mask, dtype)
            live = [
                (o, g.to(dtype))
                for o, g in zip(outputs, [grad_out, *grad_states], strict=True)
                if g is not None
            ]
            if not live:
                return None
            tracked: list[Tensor] = []
            for p in products:
                tracked.extend(p.outputs if isinstance(p.outputs, list) else [p.outputs])
            backprops = list(
                torch.autograd.grad(
                    [o for o, _ in live],
                    tracked,
                    grad_outputs=[g for _, g in live],
                    allow_unused=True,
                    materialize_grads=True,
                )
            )

        _collect(module, products, backprops, ctx, pieces, bias_pieces)
        return batch

    @staticmethod
    def _initial_state(
        module: nn.RNNBase, hx: object, batch: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor | None]:
        """``h0 (L*D, B, P)`` and, for LSTM, ``c0 (L*D, B, H)``; zeros when not given."""
        layers = module.num_layers * (2 if module.bidirectional else 1)
        proj = getattr(module, "proj_size", 0)
        h_size = proj if proj > 0 else module.hidden_size
        if hx is None:
            h0 = torch.zeros(layers, batch, h_size, dtype=dtype, device=device)
            if module.mode != "LSTM":
                return h0, None
            return h0, torch.zeros(layers, batch, module.hidden_size, dtype=dtype, device=device)
        # The module's forward has already checked the state's type and shapes.
        h0, c0 = hx if module.mode == "LSTM" else (hx, None)  # type: ignore[misc]
        return h0.to(dtype), c0.to(dtype) if c0 is not None else None

    # ------------------------------------------------------------------ the recurrence
    def _replay(
        self,
        module: nn.RNNBase,
        x: Tensor,
        h0: Tensor,
        c0: Tensor | None,
        mask: Tensor | None,
        dtype: torch.dtype,
    ) -> tuple[list[_Products], list[Tensor]]:
        """Run the recurrence on time-major ``x (T, B, K)``.

        Returns the matrix products to differentiate against, and ``[output, h_n]`` (plus
        ``c_n`` for LSTM) with the module's shapes, time-major.
        """
        directions = 2 if module.bidirectional else 1
        # By name rather than from named_parameters: a weight under torch.nn.utils.parametrize
        # is computed (and its original belongs to a child module), but the recurrence and the
        # other weights' gradients are the same.
        weights = {n: getattr(module, n).detach().to(dtype) for n in module._flat_weights_names}
        products: list[_Products] = []
        h_last: list[Tensor] = []
        c_last: list[Tensor] = []
        layer_input = x
        for layer in range(module.num_layers):
            direction_outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                index = layer * directions + direction
                outputs, h_n, c_n = self._direction(
                    module,
                    weights,
                    suffix,
                    layer_input,
                    h0[index],
                    c0[index] if c0 is not None else None,
                    mask,
                    reverse=direction == 1,
                    products=products,
                )
                direction_outputs.append(outputs)
                h_last.append(h_n)
                if c_n is not None:
                    c_last.append(c_n)
            layer_input = (
                torch.cat(direction_outputs, -1) if directions > 1 else direction_outputs[0]
            )
        results = [layer_input, torch.stack(h_last)]
        if module.mode == "LSTM":
            results.append(torch.stack(c_last))
        return products, results

    @staticmethod
    def _direction(
        module: nn.RNNBase,
        weights: dict[str, Tensor],
        suffix: str,
        x: Tensor,
        h: Tensor,
        c: Tensor | None,
        mask: Tensor | None,
        reverse: bool,
        products: list[_Products],
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One layer in one direction, with PyTorch's cell formulas. Appends its products;
        returns ``(outputs (T, B, P), h_n (B, P), c_n (B, H) | None)``."""
        w_ih, w_hh = weights["weight_ih" + suffix], weights["weight_hh" + suffix]
        b_ih = weights.get("bias_ih" + suffix)
        b_hh = weights.get("bias_hh" + suffix)
        w_hr = weights.get("weight_hr" + suffix)
        steps = x.shape[0]

        # Every step's input projection at once. On the first layer nothing upstream requires
        # grad, so the product becomes a leaf to differentiate against.
        ih = x @ w_ih.T if b_ih is None else torch.addmm(b_ih, x.flatten(0, 1), w_ih.T)
        ih = ih.reshape(steps, x.shape[1], -1)
        if not ih.requires_grad:
            ih.requires_grad_()
        hh_in: list[Tensor] = []
        hh_out: list[Tensor] = []
        hr_in: list[Tensor] = []
        hr_out: list[Tensor] = []
        outputs: list[Tensor | None] = [None] * steps
        for t in reversed(range(steps)) if reverse else range(steps):
            hh = h @ w_hh.T if b_hh is None else torch.addmm(b_hh, h, w_hh.T)
            if not hh.requires_grad:  # the initial state of a layer: a leaf, as above
                hh.requires_grad_()
            hh_in.append(h)
            hh_out.append(hh)
            h_new, c_new = _cell(module.mode, ih[t], hh, h, c)
            if w_hr is not None:
                hr_in.append(h_new)
                h_new = h_new @ w_hr.T
                hr_out.append(h_new)
            if c_new is not None:
                c = c_new if mask is None else torch.where(mask[t], c_new, c)
            h = h_new if mask is None else torch.where(mask[t], h_new, h)
            outputs[t] = h
        # Steps were visited in processing order; keep each product's lists in that order.
        products.append(_Products("weight_ih" + suffix, _bias(b_ih, "bias_ih" + suffix), x, ih))
        products.append(
            _Products("weight_hh" + suffix, _bias(b_hh, "bias_hh" + suffix), hh_in, hh_out)
        )
        if w_hr is not None:
            products.append(_Products("weight_hr" + suffix, None, hr_in, hr_out))
        return torch.stack(outputs), h, c  # type: ignore[arg-type]


_CELL_BASES: tuple[type[nn.Module], ...] = (nn.RNNCell, nn.GRUCell, nn.LSTMCell)


@register_rule(*_CELL_BASES)
class RecurrentCellRule(_ReplayRule):
    """``nn.RNNCell``/``GRUCell``/``LSTMCell``: each call is one step, replayed from its input
    and state; a cell called in a loop sums its steps, like a layer over a sequence."""

    def __init__(self) -> None:
        self._feeds: dict[tuple[torch.device, torch.dtype], bool] = {}

    def check(self, module: nn.Module) -> str | None:
        base = next(k for k in _CELL_BASES if isinstance(module, k))
        if type(module).forward is not base.forward:
            return (
                f"it overrides the forward of nn.{base.__name__}, so the rule's replay of "
                f"nn.{base.__name__}'s step would not be its computation; give it a rule of "
                f"its own, or call a plain nn.{base.__name__} inside it"
            )
        return None

    def _replay_call(
        self,
        module: nn.Module,
        call: Call,
        ctx: RuleContext,
        pieces: dict[str, _Pieces],
        bias_pieces: dict[str, list[Tensor]],
    ) -> int | None:
        assert isinstance(module, nn.RNNCellBase)
        if isinstance(module, nn.LSTMCell):
            mode = "LSTM"
        elif isinstance(module, nn.GRUCell):
            mode = "GRU"
        else:
            mode = "RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU"
        x = call.args[0] if call.args else call.kwargs["input"]
        hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
        if x.dim() != 2:
            raise SkipModule(
                f"its input has {x.dim()} dims; an unbatched (H_in,) step has no sample "
                "dimension: add one (x.unsqueeze(0))"
            )
        batch, dtype = x.shape[0], ctx.dtype
        if batch == 0:
            return None
        h, c = (hx if mode == "LSTM" else (hx, None)) if hx is not None else (None, None)
        zeros = x.new_zeros(batch, module.hidden_size, dtype=dtype)
        h = zeros if h is None else h.to(dtype)
        c = (zeros if c is None else c.to(dtype)) if mode == "LSTM" else None

        w = {n: getattr(module, n) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        w = {n: t.detach().to(dtype) for n, t in w.items() if t is not None}
        a = x.to(dtype)
        ih = (
            a @ w["weight_ih"].T
            if "bias_ih" not in w
            else torch.addmm(w["bias_ih"], a, w["weight_ih"].T)
        )
        hh = (
            h @ w["weight_hh"].T
            if "bias_hh" not in w
            else torch.addmm(w["bias_hh"], h, w["weight_hh"].T)
        )
        with torch.enable_grad():
            ih.requires_grad_()
            hh.requires_grad_()
            h_new, c_new = _cell(
                mode, ih, hh, h, c, mode == "LSTM" and self._state_feeds_output(module, x)
            )
            live = [
                (o, g.to(dtype))
                for o, g in zip([h_new, c_new], call.grads, strict=False)
                if o is not None and g is not None
            ]
            if not live:
                return None
            backprops = list(
                torch.autograd.grad(
                    [o for o, _ in live],
                    [ih, hh],
                    grad_outputs=[g for _, g in live],
                    allow_unused=True,
                    materialize_grads=True,
                )
            )
        products = [
            _Products("weight_ih", _bias(w.get("bias_ih"), "bias_ih"), [a], [ih]),
            _Products("weight_hh", _bias(w.get("bias_hh"), "bias_hh"), [h], [hh]),
        ]
        _collect(module, products, backprops, ctx, pieces, bias_pieces)
        return batch

    def _state_feeds_output(self, module: nn.Module, x: Tensor) -> bool:
        """Whether the ``c'`` that ``nn.LSTMCell`` returns is the very tensor its ``h'`` was
        computed from in the autograd graph, so that autograd hands ``c'`` the gradient
        flowing back from ``h'`` as well as its own. That depends on the kernel: the
        composite one (CPU) does, a fused one (CUDA) returns both from one node and does not.
        Probed once per device and dtype on a one-row step."""
        key = (x.device, x.dtype)
        known = self._feeds.get(key)
        if known is None:
            w = [getattr(module, n) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            w = [t.detach() if t is not None else None for t in w]
            with torch.enable_grad():
                probe_input = x[:1].detach().requires_grad_()
                zeros = probe_input.new_zeros(1, w[1].shape[1])
                h_new, c_new = torch.lstm_cell(probe_input, (zeros, zeros), *w)
            known = _reaches(h_new.grad_fn, c_new.grad_fn)
            self._feeds[key] = known
        return known


def _reaches(start: Any, target: Any, limit: int = 64) -> bool:
    """Whether autograd node ``target`` is among the first ``limit`` nodes strictly upstream
    of ``start`` (breadth first); a node that returned both tensors is not upstream."""
    queue, seen = [fn for fn, _ in start.next_functions], set()
    while queue and len(seen) < limit:
        node = queue.pop(0)
        if node is None or id(node) in seen:
            continue
        if node is target:
            return True
        seen.add(id(node))
        queue.extend(fn for fn, _ in node.next_functions)
    return False


def _collect(
    module: nn.Module,
    products: list[_Products],
    backprops: list[Tensor],
    ctx: RuleContext,
    pieces: dict[str, _Pieces],
    bias_pieces: dict[str, list[Tensor]],
) -> None:
    """Turn the products of one replayed call and their backprops (in the order the products
    list their outputs) into per-parameter pieces."""
    for p in products:
        if isinstance(p.outputs, list):
            n = len(p.outputs)
            delta = torch.stack(backprops[:n])
            z = torch.stack(p.outputs).detach()
            a = torch.stack(p.inputs).detach()  # type: ignore[arg-type]
        else:
            n = 1
            delta, z, a = backprops[0], p.outputs.detach(), p.inputs.detach()  # type: ignore[union-attr]
        del backprops[:n]
        # (T, B, .) -> (B, T, .): samples first, as the outer-product routes expect.
        delta, z, a = delta.transpose(0, 1), z.transpose(0, 1), a.transpose(0, 1)
        bias_grad = delta.sum(1) if p.bias is not None else None
        if p.weight in ctx.want:
            # <G_i, W> = sum_t delta_t . (z_t - b), from the replayed products.
            dot = torch.linalg.vecdot(delta, z).sum(1)
            if bias_grad is not None:
                dot = dot - bias_grad @ getattr(module, p.bias).detach().to(ctx.dtype)
            piece = pieces.setdefault(p.weight, _Pieces())
            piece.a.append(a)
            piece.delta.append(delta)
            piece.dot.append(dot)
        if p.bias is not None and bias_grad is not None and p.bias in ctx.want:
            bias_pieces.setdefault(p.bias, []).append(bias_grad)


def _cell(
    mode: str,
    gi: Tensor,
    hh: Tensor,
    h: Tensor,
    c: Tensor | None,
    state_grad_includes_output: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One step of PyTorch's cell from its two products ``gi = x W_ih^T + b_ih`` and
    ``hh = h W_hh^T + b_hh`` (``(B, gates * H)``): ``(h_new, c_new)``, ``c_new`` for LSTM only
    (``h_new`` before any LSTM projection).

    ``state_grad_includes_output``: the gradient that will be given for ``c_new`` already
    holds the part that flows back from ``h_new``, so ``h_new`` is formed from a detached
    ``c_new`` to count that part once."""
    if mode == "LSTM":
        assert c is not None
        i, f, g, o = (gi + hh).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_for_h = c_new.detach() if state_grad_includes_output else c_new
        return torch.sigmoid(o) * torch.tanh(c_for_h), c_new
    if mode == "GRU":
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = hh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None
    if mode == "RNN_TANH":
        return torch.tanh(gi + hh), None
    return torch.relu(gi + hh), None


def _bias(bias: Tensor | None, name: str) -> str | None:
    return None if bias is None else name
