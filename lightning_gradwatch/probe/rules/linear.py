"""``nn.Linear`` with any number of leading dimensions (``T`` = product of the middle dims)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._linalg import (
    bias_stats,
    outer_product_moments,
    require_one_batch,
    row_sq_norm,
    rowdot,
    rows_times,
)
from ..input_grad import InputGrad, input_grad_route
from ..registry import Call, LayerRule, ParamStats, RuleContext, SkipModule, register_rule


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    positionwise = True

    def input_grad_route(self, module: nn.Module, args: tuple, output: Tensor) -> InputGrad | None:
        # <G_i, W> from the input's gradient: the output is then not kept (see input_grad.py).
        # Only for a layer that widens (a feed-forward block's first layer), where both gain:
        # the output is the larger tensor, and the dot reads (B, ..., in) rather than
        # (B, ..., out). Elsewhere the longer dot, run inside the backward, costs more step
        # time (measured: ~3% of an MLP step for one square 512-wide layer) than keeping an
        # output no larger than the input autograd keeps anyway.
        assert isinstance(module, nn.Linear)
        if not args or module.out_features <= module.in_features:
            return None
        return input_grad_route(output, args[0])

    def compute(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats]:
        assert isinstance(module, nn.Linear)
        if len(calls) == 1 and not ctx.need_grad_sample:
            fast = self._one_2d_call(module, calls[0], ctx)
            if fast is not None:
                return fast
        weight = module.weight.detach()
        bias = module.bias.detach().to(ctx.dtype) if module.bias is not None else None
        inputs, deltas, dots = [], [], []
        with_bias: list[Tensor] = []  # delta of the calls whose dot includes delta . b
        waiting: list[InputGrad] = []
        require_one_batch(calls)
        for call in calls:
            x, grad = call.args[0], call.grads[0]
            if grad is None:
                continue
            if x.dim() < 2:
                raise SkipModule("unbatched 1-D input has no sample dimension")
            batch = x.shape[0]
            a = x.detach().to(ctx.dtype).reshape(batch, -1, module.in_features)
            delta = grad.to(ctx.dtype).reshape(batch, -1, module.out_features)
            inputs.append(a)
            deltas.append(delta)
            route = call.input_grad
            if route is not None and route.usable:
                # <G_i, W> = sum_t (delta_t W) . a_t, autograd's gradient at the input: read
                # when the call's product node has run (already, for a call's node that ran
                # before this module's last output gradient arrived).
                if route.arrived:
                    dots.append(route.sample_dots(batch).to(ctx.dtype))
                else:
                    waiting.append(route)
            elif call.output_intact():
                # <G_i, W> = sum_t delta_t . (z_t - b), from the output already in memory; the
                # bias term is folded out afterwards rather than subtracted everywhere.
                dots.append(rowdot(delta, call.outputs[0].to(ctx.dtype)))
                with_bias.append(delta)
            else:  # not kept, or overwritten in place after the forward: recompute W a
                dots.append(rowdot(delta, a @ weight.to(ctx.dtype).T))
        if not deltas:
            return {}
        if (
            len(deltas) == 1
            and deltas[0].shape[1] == 1
            and not ctx.need_grad_sample
            and len(with_bias) == 1
        ):
            return self._single_position(module, inputs[0][:, 0], deltas[0][:, 0], dots[0], ctx)
        # Calls of the same module in one forward (weight sharing) add their outer products,
        # which is the same as one call over the concatenated positions.
        a = torch.cat(inputs, 1) if len(inputs) > 1 else inputs[0]
        delta = torch.cat(deltas, 1) if len(deltas) > 1 else deltas[0]
        bias_grad = delta.sum(1) if bias is not None else None
        dot = torch.stack(dots).sum(0) if len(dots) > 1 else dots[0] if dots else None
        if bias is not None and with_bias:
            assert dot is not None and bias_grad is not None
            z_bias_grad = bias_grad if len(with_bias) == len(deltas) else None
            if z_bias_grad is None:
                z_bias_grad = torch.stack([d.sum(1) for d in with_bias]).sum(0)
            dot = dot - z_bias_grad @ bias

        out: dict[str, ParamStats] = {}
        if "weight" in ctx.want:
            keep = "weight" in ctx.need_grad_sample
            sq_norm, sum_sq, grad_sample, grad_sum = outer_product_moments(
                a.unsqueeze(2),
                delta.unsqueeze(2),
                ctx.need_sum_sq,
                keep,
                ctx.chunk_elements,
                need_sum=ctx.need_grad_sum,
            )
            out["weight"] = ParamStats(
                dot=dot if dot is not None else sq_norm.new_zeros(()),
                sq_norm=sq_norm,
                sum_sq=sum_sq.reshape(weight.shape) if sum_sq is not None else None,
                grad_sample=grad_sample.reshape(-1, *weight.shape) if keep else None,
                grad_sum=grad_sum.reshape(weight.shape) if grad_sum is not None else None,
            )
            if waiting:
                _fill_when_arrived(out["weight"], dot, waiting, a.shape[0], ctx.dtype)
        if bias is not None and bias_grad is not None and "bias" in ctx.want:
            out["bias"] = bias_stats(
                bias_grad, bias, ctx.need_sum_sq, "bias" in ctx.need_grad_sample
            )
        return out

    def _one_2d_call(
        self, module: nn.Linear, call: Call, ctx: RuleContext
    ) -> dict[str, ParamStats] | None:
        """The most common case, one call on a ``(B, in)`` input, with as little Python per
        step as possible (the general path below handles it too); ``None`` otherwise."""
        x, grad = call.args[0], call.grads[0]
        if grad is None or x.dim() != 2:
            return None
        route = call.input_grad
        waiting = route is not None and route.usable and not route.arrived
        if not waiting and not call.output_intact():
            return None
        a = x if x.dtype == ctx.dtype else x.to(ctx.dtype)
        delta = grad if grad.dtype == ctx.dtype else grad.to(ctx.dtype)
        if waiting:
            assert route is not None
            return self._single_position(module, a, delta, None, ctx, route)
        z = call.outputs[0]
        assert z is not None
        z = z if z.dtype == ctx.dtype else z.to(ctx.dtype)
        # <G_i, W> = delta_i . (z_i - b): see compute.
        return self._single_position(module, a, delta, rowdot(delta, z), ctx)

    @staticmethod
    def _single_position(
        module: nn.Linear,
        a: Tensor,
        delta: Tensor,
        dot_z: Tensor | None,
        ctx: RuleContext,
        route: InputGrad | None = None,
    ) -> dict[str, ParamStats]:
        """The common 2-D case, in four fused passes: the bias's statistics reuse the weight's
        ``|delta_i|^2`` and ``delta_i . b``.

        Args:
            a: ``(B, in)``; delta: ``(B, out)``; dot_z: ``(B,)`` ``delta_i . z_i``, or
            ``None`` with ``route``, whose input gradient gives ``<G_i, W>`` when its node
            has run.
        """
        delta_sq = row_sq_norm(delta)
        # delta**2 once, for both sums of squares: a pass over (B, out) saved per step.
        delta2 = delta.square() if ctx.need_sum_sq else None
        out: dict[str, ParamStats] = {}
        bias_dot = None
        if module.bias is not None:
            bias = module.bias.detach()
            bias_dot = rows_times(delta, bias if bias.dtype == ctx.dtype else bias.to(ctx.dtype))
            if "bias" in ctx.want:
                out["bias"] = ParamStats(
                    dot=bias_dot,
                    sq_norm=delta_sq,
                    sum_sq=delta2.sum(0) if delta2 is not None else None,
                    grad_sum=delta.sum(0) if ctx.need_sum_sq and ctx.need_grad_sum else None,
                )
        if "weight" in ctx.want:
            dot = dot_z
            if dot is not None and bias_dot is not None:
                dot = dot - bias_dot
            out["weight"] = ParamStats(
                dot=dot if dot is not None else delta_sq,  # a stand-in, replaced below
                sq_norm=delta_sq * row_sq_norm(a),
                sum_sq=delta2.T @ a.square() if delta2 is not None else None,
                # One weight-sized product, skipped when autograd's batch gradient is exact.
                grad_sum=delta.T @ a if ctx.need_sum_sq and ctx.need_grad_sum else None,
            )
            if dot_z is None:
                assert route is not None
                _fill_when_arrived(out["weight"], None, [route], a.shape[0], ctx.dtype)
        return out


def _fill_when_arrived(
    stats: ParamStats,
    known: Tensor | None,
    waiting: list[InputGrad],
    batch: int,
    dtype: torch.dtype,
) -> None:
    """Set ``stats.dot`` to ``known`` (``(B,)``, the calls' parts already formed, or ``None``)
    plus the input-gradient parts of the ``waiting`` calls once their product nodes have all
    run in this backward (before the probe assembles the step: the engine said it runs them,
    see ``input_grad.watch``). NaN until then, never a partial sum."""
    stats.dot = torch.full((batch,), float("nan"), dtype=dtype, device=stats.sq_norm.device)
    remaining = [len(waiting)]

    def arrived() -> None:
        remaining[0] -= 1
        if remaining[0]:
            return
        parts = [route.sample_dots(batch).to(dtype) for route in waiting]
        if known is not None:
            parts.append(known)
        stats.dot = torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]
        for route in waiting:
            route.dots = None

    for route in waiting:
        route.on_arrival.append(arrived)
