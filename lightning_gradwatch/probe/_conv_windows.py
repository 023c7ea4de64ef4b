"""Per-sample weight gradients of a convolution from its input windows, a chunk of samples at a
time.

The input patches are gathered into a ``(n*G, C_in/G * k, L)`` buffer, one copy per kernel
offset (offset ``j`` reads the window of the padded input at ``j * dilation``, every ``stride``-th
position, the same size as the output), and one batched product with the output gradients gives
each sample's gradient::

    G_i[g] = cols_i[g] @ delta_i[g]^T        (C_in/G * k x C_out/G, over the L positions)

Unlike the per-offset products of :mod:`._conv_linalg`, the products are as long as the output
(no padding of the output gradient, no extra positions), and their rows number ``C_in/G * k``
rather than ``C_in/G``: the form for thin layers (few input channels, e.g. an image's 1 or 3),
whose per-offset products would be too thin for the matrix kernels. Each copy moves runs of the
output's last dimension; on a unit stride those are contiguous, unlike the gather of
``Tensor.unfold`` (strided in every dim) or ``F.unfold``, both measured slower on a CPU.

The chunk's gradients are then at hand whole, so ``<G_i, W>`` is one product with the weight
(cheaper than reading the output and its gradient when the layer has fewer weights than
output elements per sample), and the sums of squares come from the same buffer.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from ._conv_linalg import pad_input
from ._linalg import chunk_size, row_sq_norm

#: Bound on the elements of the patch buffer (and gradients) of one chunk, besides the probe's
#: own bound on materialised per-sample tensors: 4 MiB in float32. Chunks of a quarter of
#: that were not faster on the benchmark layers (CPU); larger ones only hold more memory.
WINDOW_CHUNK_ELEMENTS = 2**20


def window_moments(
    x: Tensor,
    delta: Tensor,
    conv: nn.modules.conv._ConvNd,
    weight: Tensor,
    need_sum_sq: bool,
    need_sum: bool,
    budget: int,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Inner products with the weight, squared norms (and optionally sums of squares and sums)
    of a convolution's per-sample weight gradients.

    Args:
        x: ``(B, C_in, *S)`` input of the convolution (before its padding).
        delta: ``(B, C_out, *L)`` output gradients.
        conv: the convolution (its padding, stride, dilation, groups and kernel size).
        weight: ``conv.weight`` in the dtype of ``x``, ``(C_out, C_in/G, *kernel)``.
        need_sum_sq: also return ``sum_i G_i**2``.
        need_sum: also return ``sum_i G_i`` (only with ``need_sum_sq``).
        budget: max elements of the per-sample gradients (and patches) formed at once.

    Returns:
        ``dot (B,)``, ``sq_norm (B,)``, ``sum_sq | None`` and ``grad_sum | None`` (both the
        weight's shape), in ``x``'s dtype.
    """
    x = pad_input(x, conv)
    batch, c_in, *size = x.shape
    c_out, out_size = delta.shape[1], tuple(delta.shape[2:])
    groups = conv.groups
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    cg, og = c_in // groups, c_out // groups
    k = math.prod(kernel)
    positions = math.prod(out_size)
    need_sum = need_sum and need_sum_sq
    rows = cg * k
    per_sample = groups * rows * max(positions, og)
    step = chunk_size(batch, per_sample, min(budget, WINDOW_CHUNK_ELEMENTS))
    # The weight in the products' layout (G, C_in/G * k, C_out/G), flat.
    flat_weight = weight.reshape(groups, og, rows).transpose(1, 2).reshape(-1)
    windows = [
        tuple(
            slice(i * dl, i * dl + s * (n - 1) + 1, s)
            for i, dl, s, n in zip(index, dilation, stride, out_size, strict=True)
        )
        for index in itertools.product(*(range(n) for n in kernel))
    ]
    grouped_x = x.view(batch, groups, cg, *size)
    delta = delta.reshape(batch * groups, og, positions)
    dot = x.new_empty(batch)
    sq_norm = x.new_empty(batch)
    sum_sq = x.new_zeros(groups, rows, og) if need_sum_sq else None
    grad_sum = x.new_zeros(groups, rows, og) if need_sum else None
    cols = x.new_empty(step, groups, cg, k, *out_size)
    for lo in range(0, batch, step):
        hi = min(batch, lo + step)
        n = hi - lo
        chunk = cols[:n]
        for j, window in enumerate(windows):
            chunk[:, :, :, j].copy_(grouped_x[(slice(lo, hi), slice(None), slice(None), *window)])
        # (n*G, C_in/G * k, L) @ (n*G, L, C_out/G): the transposed view of the output
        # gradient is a valid operand as it is.
        patches = chunk.view(n * groups, rows, positions)
        g = torch.bmm(patches, delta[lo * groups : hi * groups].transpose(1, 2))
        flat = g.view(n, -1)
        dot[lo:hi] = flat @ flat_weight
        sq_norm[lo:hi] = row_sq_norm(flat)
        if grad_sum is not None:
            grad_sum += g.view(n, groups, rows, og).sum(0)
        if sum_sq is not None:
            sum_sq += g.square_().view(n, groups, rows, og).sum(0)

    def to_weight(t: Tensor | None) -> Tensor | None:
        """``(G, C_in/G * k, C_out/G)`` -> the weight's ``(G*C_out/G, C_in/G, *kernel)``."""
        if t is None:
            return None
        return t.transpose(1, 2).reshape(weight.shape)

    return dot, sq_norm, to_weight(sum_sq), to_weight(grad_sum)
