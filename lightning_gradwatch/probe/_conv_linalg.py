"""Per-sample weight-gradient moments of a convolution, one kernel offset at a time.

The weight gradient of sample ``i`` at kernel offset ``j`` is a plain product of the output
gradient and the input window that offset reads (per group)::

    G_i[:, :, j] = X_i[:, window_j] @ delta_i^T        (C_in/G x C_out/G, over positions)

For a 1-D convolution with stride 1 that window is a slice of the padded input, so each offset
is one batched product on a view: no unfolded ``(B, L, C k)`` copy of the patches (whose
strided gather cost as much as the product itself, measured on a CPU for 32 channels and kernel
3) and no per-sample gradient buffer larger than one offset's. Two steps make every other case
that one:

- stride ``s > 1``: the input is split once into its phases (positions ``r, r + s, ...`` for
  each residue ``r``, together the size of the input); offset ``j`` reads a unit-stride window
  of phase ``j * dilation mod s``;
- N-d: the spatial dims of each phase are flattened; a window of ``L_1 x L_2`` positions is then
  the contiguous run of ``(L_1 - 1) P_2 + L_2`` flat positions (``P_2`` the phase's width)
  starting at its corner, and the positions of that run outside the window (the ends of rows)
  meet zeros in the output gradient, which is padded from width ``L_2`` to ``P_2`` once.
  The products are longer by about ``P_2 / L_2`` (e.g. 17/16), not by the kernel size.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._linalg import chunk_size, row_sq_norm


def pad_input(x: Tensor, conv: nn.modules.conv._ConvNd) -> Tensor:
    """The input as the convolution sees it after padding, so that its own padding is zero.

    Handles numeric padding, ``"same"`` (asymmetric for even kernels), ``"valid"`` and the
    non-zero padding modes.
    """
    nd = x.dim() - 2
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    if conv.padding == "same":
        pads: list[int] = []
        for d in reversed(range(nd)):
            total = conv.dilation[d] * (conv.kernel_size[d] - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)
    if conv.padding != "valid" and any(conv.padding):
        return F.pad(x, [p for p in reversed(conv.padding) for _ in range(2)])
    return x


def input_phases(x: Tensor, conv: nn.modules.conv._ConvNd) -> Tensor:
    """The padded input split into its stride phases: ``(B, C, *stride, *P)``, element
    ``[b, c, *r, *p]`` the padded input at position ``p * stride + r`` (zero past its end,
    ``P_d = ceil(S_d / s_d)`` for padded size ``S_d``).

    (Writing the phases straight from the unpadded input, padding included, was measured
    slower on a CPU: a copy strided in two dims costs more than these two plain ones.)
    """
    stride = conv.stride
    x = pad_input(x, conv).contiguous()
    batch, channels, *size = x.shape
    if all(s == 1 for s in stride):
        return x.view(batch, channels, *stride, *size)
    extra = [(-n) % s for n, s in zip(size, stride, strict=True)]
    if any(extra):
        x = F.pad(x, [p for e in reversed(extra) for p in (0, e)])
    phase_size = [(n + e) // s for n, e, s in zip(size, extra, stride, strict=True)]
    split = [v for p, s in zip(phase_size, stride, strict=True) for v in (p, s)]
    nd = len(size)
    perm = [0, 1, *(3 + 2 * d for d in range(nd)), *(2 + 2 * d for d in range(nd))]
    return x.reshape(batch, channels, *split).permute(perm).contiguous()


def offset_moments(
    x: Tensor,
    delta: Tensor,
    conv: nn.modules.conv._ConvNd,
    need_sum_sq: bool,
    need_sum: bool,
    budget: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Squared norms (and optionally sums of squares and sums) of a convolution's per-sample
    weight gradients.

    Args:
        x: ``(B, C_in, *S)`` input of the convolution.
        delta: ``(B, C_out, *L)`` output gradients.
        conv: the convolution (its stride, dilation, groups and kernel size).
        need_sum_sq: also return ``sum_i G_i**2``.
        need_sum: also return ``sum_i G_i`` (only with ``need_sum_sq``).
        budget: max elements of the per-sample gradients formed at once.

    Returns:
        ``sq_norm (B,)``, ``sum_sq | None`` and ``grad_sum | None`` (both ``conv.weight``'s
        shape ``(C_out, C_in/G, *kernel)``), in ``x``'s dtype.
    """
    batch, c_in = x.shape[:2]
    c_out, out_size = delta.shape[1], delta.shape[2:]
    nd = len(out_size)
    groups = conv.groups
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    cg, og = c_in // groups, c_out // groups
    need_sum = need_sum and need_sum_sq
    phases = input_phases(x, conv)  # (B, C, *s, *P)
    phase_size = phases.shape[2 + nd :]
    flat_phases = phases.view(batch, c_in, *stride, -1)
    # Flat positions of a phase: the strides of its (P_1, ..., P_n) layout.
    flat_stride = [math.prod(phase_size[d + 1 :]) for d in range(nd)]
    run = sum((n - 1) * f for n, f in zip(out_size, flat_stride, strict=True)) + 1
    if nd > 1:  # rows of the output gradient padded to the phase's width, zeros at the ends
        pads = [
            p
            for n, m in zip(reversed(out_size), reversed(phase_size), strict=False)
            for p in (0, m - n)
        ][: 2 * (nd - 1)]
        delta = F.pad(delta, pads).flatten(2)[:, :, :run]
    # (B*G, run, O/G): the transposed view of delta, a valid operand of the product as it is.
    delta_t = delta.reshape(batch * groups, og, run).transpose(1, 2)
    sq_norm = x.new_zeros(batch)
    k = math.prod(kernel)
    sum_sq = x.new_zeros(k, groups, cg, og) if need_sum_sq else None
    grad_sum = x.new_zeros(k, groups, cg, og) if need_sum else None
    offsets = []
    for j, index in enumerate(itertools.product(*(range(n) for n in kernel))):
        at = [i * dl for i, dl in zip(index, dilation, strict=True)]
        residue = tuple(a % s for a, s in zip(at, stride, strict=True))
        start = sum((a // s) * f for a, s, f in zip(at, stride, flat_stride, strict=True))
        offsets.append((j, residue, start))

    def to_weight(t: Tensor | None) -> Tensor | None:
        """``(k, G, C/G, O/G)`` -> the weight's ``(G*O/G, C/G, *kernel)``."""
        if t is None:
            return None
        return t.permute(1, 3, 2, 0).reshape(c_out, cg, *kernel)

    step = chunk_size(batch, groups * cg * og, budget)
    buffer = x.new_empty(step * groups, cg, og)
    for lo in range(0, batch, step):
        hi = min(batch, lo + step)
        rows = (hi - lo) * groups
        out = buffer[:rows]
        for j, residue, start in offsets:
            window = flat_phases[(slice(lo, hi), slice(None), *residue)][:, :, start : start + run]
            torch.bmm(window.reshape(rows, cg, run), delta_t[lo * groups : hi * groups], out=out)
            sq_norm[lo:hi] += row_sq_norm(out.view(hi - lo, -1))
            if grad_sum is not None:
                grad_sum[j] += out.view(hi - lo, groups, cg, og).sum(0)
            if sum_sq is not None:
                sum_sq[j] += out.square_().view(hi - lo, groups, cg, og).sum(0)
    return sq_norm, to_weight(sum_sq), to_weight(grad_sum)
