"""``nn.Linear`` with any number of leading dimensions (``T`` = product of the middle dims)."""

from __future__ import annotations

import torch
from torch import nn

from .._linalg import bias_stats, outer_product_stats
from ..registry import Call, LayerRule, ParamStats, RuleContext, SkipModule, register_rule


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    def compute(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats]:
        assert isinstance(module, nn.Linear)
        weight = module.weight.detach().to(ctx.dtype)
        bias = module.bias.detach().to(ctx.dtype) if module.bias is not None else None
        inputs, deltas, centred = [], [], []
        for call in calls:
            x, grad = call.args[0], call.grads[0]
            if grad is None:
                continue
            if x.dim() < 2:
                raise SkipModule("unbatched 1-D input has no sample dimension")
            batch = x.shape[0]
            a = x.detach().to(ctx.dtype).reshape(batch, -1, module.in_features)
            delta = grad.to(ctx.dtype).reshape(batch, -1, module.out_features)
            delta = delta * ctx.grad_factor(batch)
            if call.output_intact():
                # <G_i, W> = sum_t delta_t . (z_t - b): the output is already in memory.
                z = call.outputs[0].to(ctx.dtype).reshape(batch, -1, module.out_features)
                z = z - bias if bias is not None else z
            else:  # an in-place op overwrote the output after the forward: recompute W a
                z = a @ weight.T
            inputs.append(a)
            deltas.append(delta)
            centred.append(z)
        if not deltas:
            return {}
        # Calls of the same module in one forward (weight sharing) add their outer products,
        # which is the same as one call over the concatenated positions.
        a = torch.cat(inputs, 1) if len(inputs) > 1 else inputs[0]
        delta = torch.cat(deltas, 1) if len(deltas) > 1 else deltas[0]
        z = torch.cat(centred, 1) if len(centred) > 1 else centred[0]

        out: dict[str, ParamStats] = {}
        if "weight" in ctx.want:
            keep = "weight" in ctx.need_grad_sample
            sq_norm, sum_sq, grad_sample = outer_product_stats(
                a.unsqueeze(2), delta.unsqueeze(2), ctx.need_sum_sq, keep, ctx.chunk_elements
            )
            out["weight"] = ParamStats(
                dot=(delta * z).sum((1, 2)),
                sq_norm=sq_norm,
                sum_sq=sum_sq.reshape(weight.shape) if sum_sq is not None else None,
                grad_sample=grad_sample.reshape(-1, *weight.shape) if keep else None,
            )
        if bias is not None and "bias" in ctx.want:
            out["bias"] = bias_stats(
                delta.sum(1), bias, ctx.need_sum_sq, "bias" in ctx.need_grad_sample
            )
        return out


