"""``nn.Conv1d/2d/3d`` with stride, padding (numeric, ``"same"``, ``"valid"``, any padding
mode), dilation and groups.

The weight gradient is an outer product over unfolded input patches: the input is unfolded to
``(B, L, G, C_in/G * prod(kernel))`` with ``L`` output positions, matching the weight layout
``(C_out, C_in/G, *kernel)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._linalg import bias_stats, outer_product_stats, rowdot
from ..registry import Call, LayerRule, ParamStats, RuleContext, SkipModule, register_rule


def unfold_patches(x: Tensor, conv: nn.modules.conv._ConvNd) -> Tensor:
    """Input patches of an N-d convolution.

    Args:
        x: ``(B, C_in, *spatial)`` input.
        conv: the convolution whose geometry to use.

    Returns:
        ``(B, L, C_in * prod(kernel))`` with ``L`` the number of output positions, the last
        dimension ordered as ``conv.weight``'s ``(C_in, *kernel)``.
    """
    nd = x.dim() - 2
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    elif conv.padding == "same":
        pads: list[int] = []
        for d in reversed(range(nd)):
            total = dilation[d] * (kernel[d] - 1)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
    elif conv.padding != "valid" and any(conv.padding):
        x = F.pad(x, [p for p in reversed(conv.padding) for _ in range(2)])
    for d in range(nd):
        span = dilation[d] * (kernel[d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])
        if dilation[d] > 1:
            x = x[..., :: dilation[d]]
    # (B, C, O_1..O_n, k_1..k_n) -> (B, O_1..O_n, C, k_1..k_n)
    batch, channels = x.shape[:2]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    x = x.permute(perm)
    # Materialise: a view of overlapping windows (e.g. one input channel) would make every
    # batched matmul on it fall back to a loop over samples (8x slower measured on CPU).
    return x.reshape(batch, -1, channels * math.prod(kernel)).contiguous()


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(LayerRule):
    def compute(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats]:
        assert isinstance(module, nn.modules.conv._ConvNd)
        nd = len(module.kernel_size)
        weight = module.weight.detach().to(ctx.dtype)
        bias = module.bias.detach().to(ctx.dtype) if module.bias is not None else None
        groups = module.groups
        c_out = module.out_channels
        dots, patches, deltas, bias_grads = [], [], [], []
        for call in calls:
            x, grad = call.args[0], call.grads[0]
            if grad is None:
                continue
            if x.dim() != nd + 2:
                raise SkipModule("unbatched input has no sample dimension")
            batch = x.shape[0]
            x = x.detach().to(ctx.dtype)
            delta = grad.to(ctx.dtype)  # (B, C_out, *O)
            bias_grad = delta.flatten(2).sum(2)  # (B, C_out)
            if call.output_intact():  # <G_i, W> = sum delta . (z - b), bias folded out
                dot = rowdot(delta, call.outputs[0].to(ctx.dtype))
                dots.append(dot - bias_grad @ bias if bias is not None else dot)
            else:
                dots.append(rowdot(delta, module._conv_forward(x, weight, None)))
            bias_grads.append(bias_grad)
            if "weight" in ctx.want:
                a = unfold_patches(x, module)  # (B, L, C_in*K)
                patches.append(a.reshape(batch, a.shape[1], groups, -1))
                d = delta.reshape(batch, groups, c_out // groups, -1).permute(0, 3, 1, 2)
                deltas.append(d)  # (B, L, G, C_out/G)
        if not dots:
            return {}
        out: dict[str, ParamStats] = {}
        if "weight" in ctx.want:
            a = torch.cat(patches, 1) if len(patches) > 1 else patches[0]
            delta = torch.cat(deltas, 1) if len(deltas) > 1 else deltas[0]
            keep = "weight" in ctx.need_grad_sample
            sq_norm, sum_sq, grad_sample = outer_product_stats(
                a, delta, ctx.need_sum_sq, keep, ctx.chunk_elements
            )
            out["weight"] = ParamStats(
                dot=torch.stack(dots).sum(0),
                sq_norm=sq_norm,
                sum_sq=sum_sq.reshape(weight.shape) if sum_sq is not None else None,
                grad_sample=grad_sample.reshape(-1, *weight.shape) if keep else None,
            )
        if bias is not None and "bias" in ctx.want:
            out["bias"] = bias_stats(
                torch.stack(bias_grads).sum(0),
                bias,
                ctx.need_sum_sq,
                "bias" in ctx.need_grad_sample,
            )
        return out
