"""Per-sample weight-gradient moments of a 1-D convolution, one kernel offset at a time.

The weight gradient of sample ``i`` at kernel offset ``j`` is a plain product of the input
window that offset reads and the output gradient::

    G_i[:, :, j] = delta_i @ X_i[:, off_j : off_j + s (L-1) + 1 : s]^T     (O x C, per group)

with ``off_j = j * dilation`` and ``s`` the stride. For stride 1 that window is a slice of the
padded input, so each offset is one batched product on a view: no unfolded ``(B, L, C k)``
copy of the patches (whose strided gather cost as much as the product itself, measured on a
CPU for 32 channels and kernel 3) and no per-sample gradient buffer larger than one offset's.
For stride ``s > 1`` the input is split once into its ``s`` phases (``x[..., r::s]``, together
the size of the input), and offset ``j`` reads a slice of phase ``off_j mod s``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._linalg import chunk_size, row_sq_norm

#: Below this many input channels per group the products of one offset are too thin for the
#: matrix kernels (one input channel: a matrix-vector product per sample), so the rule unfolds
#: the patches instead (then cheap: the copy is small).
OFFSET_MIN_CHANNELS = 8


def prefer_offsets(conv: nn.modules.conv._ConvNd) -> bool:
    """Whether :func:`offset_moments` is the faster route for this 1-D convolution."""
    return len(conv.kernel_size) == 1 and conv.in_channels // conv.groups >= OFFSET_MIN_CHANNELS


def offset_moments(
    x_padded: Tensor,
    delta: Tensor,
    conv: nn.modules.conv._ConvNd,
    need_sum_sq: bool,
    need_sum: bool,
    budget: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Squared norms (and optionally sums of squares and sums) of a 1-D convolution's
    per-sample weight gradients.

    Args:
        x_padded: ``(B, C_in, S)`` input after :func:`~.rules.conv.pad_input`.
        delta: ``(B, C_out, L)`` output gradients.
        conv: the 1-D convolution (its stride, dilation, groups and kernel size).
        need_sum_sq: also return ``sum_i G_i**2``.
        need_sum: also return ``sum_i G_i`` (only with ``need_sum_sq``).
        budget: max elements of the per-sample gradient of one offset formed at once.

    Returns:
        ``sq_norm (B,)``, ``sum_sq | None`` and ``grad_sum | None`` (both ``conv.weight``'s
        shape ``(C_out, C_in/G, k)``), in ``x_padded``'s dtype.
    """
    batch, c_in, _ = x_padded.shape
    c_out, length = delta.shape[1], delta.shape[2]
    groups = conv.groups
    k = conv.kernel_size[0]
    stride, dilation = conv.stride[0], conv.dilation[0]
    cg, og = c_in // groups, c_out // groups
    need_sum = need_sum and need_sum_sq
    x_padded = x_padded.contiguous()
    # Phase r holds positions r, r + s, r + 2s, ...: offset j reads a unit-stride slice of one.
    residues = sorted({(j * dilation) % stride for j in range(k)})
    phases = {
        r: x_padded[:, :, r::stride].contiguous() if stride > 1 else x_padded for r in residues
    }
    # (B*G, L, O/G): the transposed view of delta, a valid operand of the product as it is.
    delta_t = delta.reshape(batch * groups, og, length).transpose(1, 2)
    sq_norm = x_padded.new_zeros(batch)
    sum_sq = x_padded.new_zeros(k, groups, cg, og) if need_sum_sq else None
    grad_sum = x_padded.new_zeros(k, groups, cg, og) if need_sum else None
    step = chunk_size(batch, groups * cg * og, budget)
    buffer = x_padded.new_empty(step * groups, cg, og)
    for lo in range(0, batch, step):
        hi = min(batch, lo + step)
        rows = (hi - lo) * groups
        out = buffer[:rows]
        for j in range(k):
            off = j * dilation
            start = off // stride
            window = phases[off % stride][lo:hi, :, start : start + length]  # (n, C_in, L)
            torch.bmm(window.reshape(rows, cg, length), delta_t[lo * groups : hi * groups], out=out)
            sq_norm[lo:hi] += row_sq_norm(out.view(hi - lo, -1))
            if grad_sum is not None:
                grad_sum[j] += out.view(hi - lo, groups, cg, og).sum(0)
            if sum_sq is not None:
                sum_sq[j] += out.square_().view(hi - lo, groups, cg, og).sum(0)

    # (k, G, C/G, O/G) -> the weight's (G*O/G, C/G, k)
    def to_weight(t: Tensor | None) -> Tensor | None:
        return t.permute(1, 3, 2, 0).reshape(c_out, cg, k) if t is not None else None

    return sq_norm, to_weight(sum_sq), to_weight(grad_sum)
