"""``nn.Conv1d/2d/3d`` with stride, padding (numeric, ``"same"``, ``"valid"``, any padding
mode), dilation and groups.

The weight gradient is an outer product over input patches. Exact routes:

- ``"windows"`` (one call of the module, see :mod:`.._conv_windows`): a chunk of samples'
  input windows copied into a patch buffer, one copy per kernel offset, then one batched
  product gives their gradients;
- ``"offsets"`` (one call, see :mod:`.._conv_linalg`): one batched product per kernel offset on
  a window of the padded input split into its stride phases, no patch buffer;
- ``"grouped"`` (2-D and 3-D): per-sample weight gradients, a chunk of samples at a time, from
  one grouped convolution backward (``groups = samples * G``);
- ``"unfold"`` (1-D): the input unfolded to ``(B, L, G, C_in/G * k)`` patches and the Linear
  algebra, which may pick the Gram form of the norm.

Which is fastest depends on the layer's shape and on the machine, so on the CPU each layer
times the candidates on its first steps and keeps the fastest (:mod:`..route_timing`). Several
calls in one forward (their gradients add before any norm) and kept per-sample gradients take
``"grouped"`` or ``"unfold"``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._conv_gram import gram_elements, gram_sq_norms
from .._conv_linalg import offset_moments, pad_input
from .._conv_windows import window_moments
from .._linalg import (
    bias_stats,
    chunk_size,
    outer_product_moments,
    require_one_batch,
    row_sq_norm,
    rowdot,
)
from ..registry import Call, LayerRule, ParamStats, RuleContext, SkipModule, register_rule
from ..route_timing import RouteTimer


def zero_padding(conv: nn.modules.conv._ConvNd) -> tuple[int, ...] | None:
    """The convolution's padding when it is symmetric zero padding the backend can apply
    itself (numeric, or ``"valid"``), else ``None`` (pad with :func:`pad_input` first)."""
    if conv.padding_mode != "zeros" or conv.padding == "same":
        return None
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    return tuple(conv.padding)


def per_sample_weight_grads(
    x_padded: Tensor,
    delta: Tensor,
    conv: nn.modules.conv._ConvNd,
    padding: tuple[int, ...] | int = 0,
) -> Tensor:
    """Per-sample weight gradients ``(n, *conv.weight.shape)`` of ``n`` samples.

    The samples become groups of one convolution: input ``(1, n*C_in, *S)``, output gradient
    ``(1, n*C_out, *O)``, ``groups = n * conv.groups``, so group ``j*G + g`` holds sample
    ``j``'s group ``g`` and the weight gradient's rows come out sample-major.

    Args:
        x_padded: ``(n, C_in, *S)`` input after :func:`pad_input`, or the raw input with
            ``padding`` from :func:`zero_padding` (no padded copy of the input).
        delta: ``(n, C_out, *O)`` output gradients.
        padding: zero padding the backend applies to ``x_padded``.
    """
    n = x_padded.shape[0]
    nd = x_padded.dim() - 2
    weight_shape = conv.weight.shape
    # The backward reads only the weight's shape, but a stride-0 stand-in (what
    # ``torch.nn.grad.conv*_weight`` passes) is first copied whole into a contiguous one by the
    # CPU backend; an uninitialised contiguous one is never written or read.
    weight = delta.new_empty(n * weight_shape[0], *weight_shape[1:])
    grads = torch.ops.aten.convolution_backward(
        delta.reshape(1, -1, *delta.shape[2:]),
        x_padded.reshape(1, -1, *x_padded.shape[2:]),
        weight,
        None,
        conv.stride,
        padding if isinstance(padding, tuple) else (padding,) * nd,
        conv.dilation,
        False,
        (0,) * nd,
        n * conv.groups,
        (False, True, False),
    )[1]
    return grads.view(n, *weight_shape)


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
    x = pad_input(x, conv)
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


#: Bound on the elements of the per-sample gradients one grouped backward forms (besides the
#: probe's own bound): 2 MiB in float32. Whole-batch products of a wide layer (64 samples of a
#: 64-channel 3x3 convolution: 9 MiB, and the backend's workspace with them) were measured 3x
#: as slow on a CPU as chunks of 8 to 16 samples (the best for the benchmark layers, where the
#: grouped backward then runs about as fast as the batch's own weight gradient for 32 to 64
#: channels); chunks of 1 or 2 samples are slower again.
GROUPED_CHUNK_ELEMENTS = 2**19

#: Times the exact routes of each convolution on its first steps and keeps the fastest.
ROUTES = RouteTimer()


#: Fewer input channels per group than this leave ``"offsets"`` out of the timed routes: each
#: of its products would have that many rows (one input channel: a matrix-vector product per
#: sample), measured several times slower than the other routes.
OFFSET_MIN_CHANNELS = 8


def candidate_routes(
    conv: nn.modules.conv._ConvNd, need_sum_sq: bool = False, out_length: int | None = None
) -> tuple[str, ...]:
    """The exact routes timed for one call without kept per-sample gradients, the default
    (used where nothing is timed) first: the patch buffer (``"windows"``; measured on a CPU,
    the fastest on thin layers, e.g. an image's 3 channels, and on short 1-D layers; on wide
    strided 2-D layers the grouped backward was up to 1.6x faster, the windows' strided copies
    costing), then, for a 1-D convolution with
    ``out_length`` output positions whose Gram matrices are smaller than its per-sample
    gradient, the Gram form of the norm (``"gram"``, without sums of squares), then one
    product per offset (``"offsets"``; not for fewer than :data:`OFFSET_MIN_CHANNELS` input
    channels per group, where those products are matrix-vector-thin), then the grouped
    convolution backward (N-d, ``"grouped"``) or unfolded patches (1-D, ``"unfold"``)."""
    nd = len(conv.kernel_size)
    routes = ["windows"]
    small = out_length is not None and gram_elements(conv, out_length) < conv.weight.numel()
    if nd == 1 and not need_sum_sq and small:
        routes.append("gram")
    if conv.in_channels // conv.groups >= OFFSET_MIN_CHANNELS:
        routes.append("offsets")
    routes.append("grouped" if nd >= 2 else "unfold")
    return tuple(routes)


#: Routes that form per-sample gradients anyway and take ``<G_i, W>`` from them: they do not
#: read the call's output.
FORMS_GRADIENTS = frozenset({"windows", "grouped"})


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(LayerRule):
    def output_needed(self, module: nn.Module, args: tuple) -> bool:
        # The other routes read <G_i, W> = sum delta . (z - b) from the kept output z, or
        # recompute z (one convolution, exact) when it was not kept. So z is dropped where
        # the route is known to form G_i: on an accelerator, where the first route
        # ("windows") is always used, and on the CPU once every route kept for inputs of this
        # shape and dtype (by timing) is such a route. A convolution's output is often many
        # times its input (more channels), and autograd does not keep it.
        x = args[0] if args else None
        if ROUTES.forced is not None:
            return ROUTES.forced not in FORMS_GRADIENTS
        if not isinstance(x, Tensor):
            return True
        if x.device.type != "cpu":
            return False
        shape, dtype = tuple(x.shape), x.dtype
        kept = [r for k, r in ROUTES.settled(module).items() if k[:2] == (shape, dtype)]
        return not kept or any(r not in FORMS_GRADIENTS for r in kept)

    def compute(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats]:
        assert isinstance(module, nn.modules.conv._ConvNd)
        nd = len(module.kernel_size)
        x, grad = calls[0].args[0], calls[0].grads[0] if calls[0].grads else None
        if (
            len(calls) != 1
            or "weight" not in ctx.want
            or "weight" in ctx.need_grad_sample
            or grad is None
            or not isinstance(x, Tensor)
        ):
            # Several calls add their gradients before any norm, and kept per-sample
            # gradients are wanted in the weight's layout: the routes that form them whole.
            return self._compute(module, calls, ctx, "grouped" if nd >= 2 else "unfold")
        out_length = grad.shape[-1] if nd == 1 else None
        routes = candidate_routes(module, ctx.need_sum_sq, out_length)
        key = (tuple(x.shape), x.dtype, ctx.dtype, ctx.need_sum_sq, ctx.need_grad_sum)
        route, timed = ROUTES.choose(module, key, routes, x.device)
        start = ROUTES.clock() if timed else 0.0
        out = self._compute(module, calls, ctx, route)
        if timed:
            ROUTES.record(module, key, routes, route, ROUTES.clock() - start)
        return out

    def _compute(
        self, module: nn.modules.conv._ConvNd, calls: list[Call], ctx: RuleContext, route: str
    ) -> dict[str, ParamStats]:
        """The statistics by one route (see :func:`candidate_routes`); ``"windows"`` and
        ``"offsets"`` take one call."""
        nd = len(module.kernel_size)
        if route == "gram" and (ctx.need_sum_sq or nd != 1):
            route = "windows"  # the Gram form gives norms of 1-D layers only
        weight = module.weight.detach().to(ctx.dtype)
        bias = module.bias.detach().to(ctx.dtype) if module.bias is not None else None
        groups = module.groups
        c_out = module.out_channels
        offset_route = "weight" in ctx.want and route in ("offsets", "windows", "gram")
        grouped_route = route == "grouped"
        padding = zero_padding(module) if grouped_route else None
        dots, patches, deltas, bias_grads, bias_dots = [], [], [], [], []
        padded_inputs: list[Tensor] = []
        require_one_batch(calls)
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
            bias_grads.append(bias_grad)
            if "weight" in ctx.want and route not in ("grouped", "windows"):
                # <G_i, W> = sum delta . (z - b), bias folded out. (The grouped and windows
                # routes form G_i anyway, and G_i . W reads weight-sized rows instead of
                # output-sized ones.)
                if call.output_intact():
                    dot = rowdot(delta, call.outputs[0].to(ctx.dtype))
                    if bias is not None:
                        bias_dots.append(bias_grad @ bias)  # the bias's own dot, too
                        dot = dot - bias_dots[-1]
                    dots.append(dot)
                else:
                    dots.append(rowdot(delta, module._conv_forward(x, weight, None)))
            if "weight" in ctx.want and grouped_route:
                padded_inputs.append(x if padding is not None else pad_input(x, module))
                deltas.append(delta)
            elif offset_route:
                padded_inputs.append(x)
                deltas.append(delta)
            elif "weight" in ctx.want:
                a = unfold_patches(x, module)  # (B, L, C_in*K)
                patches.append(a.reshape(batch, a.shape[1], groups, -1))
                d = delta.reshape(batch, groups, c_out // groups, -1).permute(0, 3, 1, 2)
                deltas.append(d)  # (B, L, G, C_out/G)
        if not bias_grads:
            return {}
        out: dict[str, ParamStats] = {}
        if "weight" in ctx.want and grouped_route:
            out["weight"] = self._grouped_weight_stats(
                module, padded_inputs, deltas, ctx, padding or 0
            )
        elif offset_route and route == "windows":
            dot, sq_norm, sum_sq, grad_sum = window_moments(
                padded_inputs[0],
                deltas[0],
                module,
                weight,
                ctx.need_sum_sq,
                ctx.need_grad_sum,
                ctx.chunk_elements,
            )
            out["weight"] = ParamStats(dot=dot, sq_norm=sq_norm, sum_sq=sum_sq, grad_sum=grad_sum)
        elif offset_route and route == "gram":
            sq_norm = gram_sq_norms(padded_inputs[0], deltas[0], module, ctx.chunk_elements)
            out["weight"] = ParamStats(dot=dots[0], sq_norm=sq_norm)
        elif offset_route:
            sq_norm, sum_sq, grad_sum = offset_moments(
                padded_inputs[0],
                deltas[0],
                module,
                ctx.need_sum_sq,
                ctx.need_grad_sum,
                ctx.chunk_elements,
            )
            out["weight"] = ParamStats(
                dot=dots[0], sq_norm=sq_norm, sum_sq=sum_sq, grad_sum=grad_sum
            )
        elif "weight" in ctx.want:
            a = torch.cat(patches, 1) if len(patches) > 1 else patches[0]
            delta = torch.cat(deltas, 1) if len(deltas) > 1 else deltas[0]
            keep = "weight" in ctx.need_grad_sample
            sq_norm, sum_sq, grad_sample, grad_sum = outer_product_moments(
                a, delta, ctx.need_sum_sq, keep, ctx.chunk_elements, ctx.need_grad_sum
            )
            out["weight"] = ParamStats(
                dot=_total(dots),
                sq_norm=sq_norm,
                sum_sq=sum_sq.reshape(weight.shape) if sum_sq is not None else None,
                grad_sample=grad_sample.reshape(-1, *weight.shape) if keep else None,
                grad_sum=grad_sum.reshape(weight.shape) if grad_sum is not None else None,
            )
        if bias is not None and "bias" in ctx.want:
            out["bias"] = bias_stats(
                _total(bias_grads),
                bias,
                ctx.need_sum_sq,
                "bias" in ctx.need_grad_sample,
                dot=_total(bias_dots) if len(bias_dots) == len(bias_grads) else None,
            )
        return out

    @staticmethod
    def _grouped_weight_stats(
        module: nn.modules.conv._ConvNd,
        inputs: list[Tensor],
        deltas: list[Tensor],
        ctx: RuleContext,
        padding: tuple[int, ...] | int,
    ) -> ParamStats:
        """Weight statistics from per-sample gradients formed in chunks of samples; several
        calls in one forward add their per-sample gradients before any norm is taken.
        ``padding`` is the zero padding still to apply to ``inputs``."""
        weight = module.weight.detach().to(ctx.dtype)
        flat_weight = weight.reshape(-1)
        batch = inputs[0].shape[0]
        budget = min(ctx.chunk_elements, GROUPED_CHUNK_ELEMENTS)
        step = chunk_size(batch, weight.numel(), budget)
        step = -(-batch // -(-batch // step))  # as many chunks, of even sizes
        keep = "weight" in ctx.need_grad_sample
        dot = flat_weight.new_empty(batch)
        sq_norm = flat_weight.new_empty(batch)
        sum_sq = flat_weight.new_zeros(weight.shape) if ctx.need_sum_sq else None
        need_sum = ctx.need_sum_sq and ctx.need_grad_sum
        grad_sum = flat_weight.new_zeros(weight.shape) if need_sum else None
        grad_sample = flat_weight.new_empty(batch, *weight.shape) if keep else None
        for lo in range(0, batch, step):
            hi = min(batch, lo + step)
            g = per_sample_weight_grads(inputs[0][lo:hi], deltas[0][lo:hi], module, padding)
            for x, d in zip(inputs[1:], deltas[1:], strict=True):
                g = g + per_sample_weight_grads(x[lo:hi], d[lo:hi], module, padding)
            dot[lo:hi] = g.reshape(hi - lo, -1) @ flat_weight
            sq_norm[lo:hi] = row_sq_norm(g)
            if grad_sample is not None:
                grad_sample[lo:hi] = g
            if grad_sum is not None:
                grad_sum += g.sum(0)
            if sum_sq is not None:
                sum_sq += g.square_().sum(0)  # g is this chunk's own buffer (copied out above)
        return ParamStats(
            dot=dot, sq_norm=sq_norm, sum_sq=sum_sq, grad_sample=grad_sample, grad_sum=grad_sum
        )


def _total(parts: list[Tensor]) -> Tensor:
    """The sum of the calls' ``(B, ...)`` parts (the one part itself for one call)."""
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
