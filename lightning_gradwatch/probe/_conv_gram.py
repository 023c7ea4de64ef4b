"""Squared norms of a 1-D convolution's per-sample weight gradients from two Gram matrices.

With ``a_l`` the input patch read by output position ``l`` and ``d_l`` the output gradient there,
``|G_i|^2 = sum_{l, l'} (a_l . a_l') (d_l . d_l')``. The patch products need no patches: offset
``j`` of position ``l`` reads padded input position ``s l + j dl``, so

    a_l . a_l' = sum_j (X^T X)[s l + j dl, s l' + j dl]

a sum of ``k`` strided diagonal blocks of the input's own ``T x T`` Gram matrix (``T`` the padded
length), formed by one batched product on the input as it is (no copy, no per-sample gradient).
This costs ``T^2 C_in/G + L^2 C_out/G`` multiply-adds per sample and group against
``L k C_in/G C_out/G`` for the gradient itself: the cheaper form for short, wide layers (e.g. 32
channels, kernel 3, stride 2 on 20 positions: about 3x fewer). Sums of squares need the
gradients themselves; this route gives norms only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._conv_linalg import pad_input
from ._conv_windows import WINDOW_CHUNK_ELEMENTS, workspace
from ._linalg import chunk_size, rowdot


def gram_elements(conv: nn.modules.conv._ConvNd, out_length: int) -> int:
    """Elements of the two Gram matrices of one sample (all groups), ``G (T^2 + L^2)``, for a
    1-D convolution with ``out_length`` output positions ``L``; ``T`` is the length of the
    padded input that they read."""
    used = (out_length - 1) * conv.stride[0] + conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
    return conv.groups * (used * used + out_length * out_length)


def gram_sq_norms(x: Tensor, delta: Tensor, conv: nn.modules.conv._ConvNd, budget: int) -> Tensor:
    """Squared norms ``(B,)`` of the per-sample weight gradients of a 1-D convolution.

    Args:
        x: ``(B, C_in, T)`` input of the convolution (before its padding).
        delta: ``(B, C_out, L)`` output gradients.
        conv: the convolution (its padding, stride, dilation, groups and kernel size).
        budget: max elements of the Gram matrices formed at once.
    """
    (k,), (stride,), (dilation,) = conv.kernel_size, conv.stride, conv.dilation
    batch, c_out, out_length = delta.shape
    groups = conv.groups
    # Only the padded positions some output reads (a stride may leave a tail unread).
    used = (out_length - 1) * stride + dilation * (k - 1) + 1
    x = pad_input(x, conv)[:, :, :used]
    c_in = x.shape[1]
    cg, og = c_in // groups, c_out // groups
    inputs = x.reshape(batch * groups, cg, used)
    grads = delta.reshape(batch * groups, og, out_length)
    per_sample = gram_elements(conv, out_length)
    step = chunk_size(batch, per_sample, min(budget, WINDOW_CHUNK_ELEMENTS))
    step = -(-batch // -(-batch // step))  # as many chunks, of even sizes
    span = stride * (out_length - 1) + 1
    sq_norm = x.new_empty(batch)
    for lo in range(0, batch, step):
        hi = min(batch, lo + step)
        rows = slice(lo * groups, hi * groups)
        n = (hi - lo) * groups
        xx = workspace("inputs", n * used * used, x).view(n, used, used)
        torch.bmm(inputs[rows].transpose(1, 2), inputs[rows], out=xx)
        dd = workspace("products", n * out_length * out_length, x)
        dd = dd.view(n, out_length, out_length)
        torch.bmm(grads[rows].transpose(1, 2), grads[rows], out=dd)
        # a_l . a_l' for all position pairs: the k strided diagonal blocks of X^T X, added.
        aa = xx[:, :span:stride, :span:stride].clone()
        for j in range(1, k):
            at = j * dilation
            aa += xx[:, at : at + span : stride, at : at + span : stride]
        sq_norm[lo:hi] = rowdot(aa, dd).view(hi - lo, groups).sum(1)
    return sq_norm
