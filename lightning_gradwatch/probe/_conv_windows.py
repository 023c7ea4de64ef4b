"""Per-sample weight gradients of a convolution from its input windows, a chunk of samples at a
time.

The input patches are gathered into a ``(n*G, C_in/G * k, L)`` buffer (offset ``j`` reads the
window of the padded input at ``j * dilation``, every ``stride``-th position, the same size as
the output), and one batched product with the output gradients gives each sample's gradient::

    G_i[g] = cols_i[g] @ delta_i[g]^T        (C_in/G * k x C_out/G, over the L positions)

Unlike the per-offset products of :mod:`._conv_linalg`, the products are as long as the output
(no padding of the output gradient, no extra positions), and their rows number ``C_in/G * k``
rather than ``C_in/G``: the form for thin layers (few input channels, e.g. an image's 1 or 3),
whose per-offset products would be too thin for the matrix kernels. The buffer is filled in
one of three ways, each copy moving runs of the output's last dimension (contiguous on a unit
stride, unlike the ``(B, L, C k)`` gather of ``Tensor.unfold`` or ``F.unfold``, both measured
slower on a CPU):

- one copy per kernel offset from the input itself, the positions that read zero padding
  zeroed: a 1-D layer with :data:`PER_OFFSET_MIN_CHANNELS` or more input channels per group
  (few offsets, each copy large), and ``padding="same"``;
- otherwise, where no window reads padding (no padding, or a padding mode other than zeros,
  applied to a copy of the input first): every offset's window in one copy, a strided view of
  the input;
- otherwise (symmetric zero padding): each chunk's samples are first written into a
  zero-bordered buffer (kept, like the patch buffer; its borders zeroed once per call), then
  copied in one go. An N-d kernel's
  ``k_1 k_2 ...`` offsets would each be a copy strided in every spatial dim, several per
  chunk, and a thin layer's would each move little.

Measured warm on a 2-core CPU with ``python benchmarks/step_anatomy.py --part windows``, against
one copy per offset throughout: ``Conv2d(3, 32, 3, padding=1)`` on 64 images 2.97 -> 2.53 ms,
``Conv2d(32, 64, 3, stride=2, padding=1)`` 15.2 -> 11.3 ms, ``Conv1d(1, 32, 5, padding=2)`` on
256 samples 236-246 -> 210 us; without padding, ``Conv2d(32, 64, 3, stride=2)`` 11.9 -> 11.2 ms
and ``Conv1d(1, 32, 5)`` 219 -> 179-184 us. ``Conv1d(32, 32, 3, stride=2)`` was 5-9% slower
in one copy (unpadded) and 9-11% slower through a padded chunk, hence the per-offset copies
for wide 1-D layers.

The chunk's gradients are then at hand whole, so ``<G_i, W>`` is one product with the weight
(cheaper than reading the output and its gradient when the layer has fewer weights than
output elements per sample), and the sums of squares come from the same buffer.
"""

from __future__ import annotations

import itertools
import math
import threading

import torch
from torch import Tensor, nn

from ._conv_linalg import pad_input
from ._linalg import chunk_size, row_sq_norm, rows_times

#: Bound on the elements of the patch buffer (and of the gradients) of one chunk, besides the
#: probe's own bound on materialised per-sample tensors: 2 MiB each in float32, kept between
#: steps (see :func:`workspace`). Each chunk costs about 10 kernel calls from Python (tens of
#: microseconds); layers as small as a 32-channel 1-D convolution on 20 positions take
#: 256 samples in 2 chunks.
WINDOW_CHUNK_ELEMENTS = 2**19


#: A 1-D convolution with at least this many input channels per group fills its patch buffer
#: one kernel offset at a time (see the module docstring): its few offsets' copies are large,
#: and one copy of all of them, or a padded copy of the input first, was measured slower.
PER_OFFSET_MIN_CHANNELS = 8


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
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    nd = len(kernel)
    before = _zero_padding_before(conv)
    if before is None:  # another padding mode: pad a copy of the input first
        x, before = pad_input(x, conv), (0,) * nd
    # How the patch buffer is filled (see the module docstring): one copy per offset for a
    # wide 1-D layer; else all offsets in one copy where no window reads padding, or from a
    # zero-bordered copy of each chunk; one copy per offset for padding="same".
    if nd == 1 and conv.in_channels // conv.groups >= PER_OFFSET_MIN_CHANNELS:
        fill = "offsets"
    elif conv.padding_mode != "zeros" or not needs_padding(conv):
        fill = "one copy"  # padded above, or nothing to pad
    elif conv.padding != "same":
        fill = "padded chunks"
    else:
        fill = "offsets"
    batch, c_in, *size = x.shape
    c_out, out_size = delta.shape[1], tuple(delta.shape[2:])
    groups = conv.groups
    cg, og = c_in // groups, c_out // groups
    k = math.prod(kernel)
    positions = math.prod(out_size)
    need_sum = need_sum and need_sum_sq
    rows = cg * k
    per_sample = groups * rows * max(positions, og)
    step = chunk_size(batch, per_sample, min(budget, WINDOW_CHUNK_ELEMENTS))
    step = -(-batch // -(-batch // step))  # as many chunks, of even sizes
    # The weight in the products' layout (G, C_in/G * k, C_out/G), flat.
    flat_weight = weight.reshape(groups, og, rows).transpose(1, 2).reshape(-1)
    grouped_x = x.reshape(batch, groups, cg, *size)
    windows = []
    if fill == "padded chunks":
        full = [n + 2 * p for n, p in zip(size, before, strict=True)]
        padded = workspace("padded", step * c_in * math.prod(full), x)
        padded = padded.view(step, groups, cg, *full)
        inside = (slice(None),) * 3 + tuple(
            slice(p, p + n) for p, n in zip(before, size, strict=True)
        )
        # Once per call: each chunk then writes only inside the borders.
        _zero_borders(padded, before, size)
    elif fill == "offsets":
        # Per kernel offset: whether some of its positions read the zero padding (they are
        # zeroed first), and the output positions and input positions it copies (None: none).
        for j, index in enumerate(itertools.product(*(range(n) for n in kernel))):
            window = _window(index, dilation, stride, before, size, out_size)
            if window is None:
                windows.append((j, True, None, None))
            else:
                spans = zip(window[0], out_size, strict=True)
                clipped = any(t.stop - t.start < n for t, n in spans)
                windows.append((j, clipped, *window))
    delta = delta.reshape(batch * groups, og, positions)
    sum_sq = x.new_zeros(groups, rows, og) if need_sum_sq else None
    grad_sum = x.new_zeros(groups, rows, og) if need_sum else None
    cols = workspace("inputs", step * groups * rows * positions, x)
    cols = cols.view(step, groups, cg, k, *out_size)
    grads = workspace("products", step * groups * rows * og, x)
    all_positions = (slice(None),) * 3
    dots, sq_norms = [], []
    for lo in range(0, batch, step):
        hi = min(batch, lo + step)
        n = hi - lo
        chunk = cols[:n]
        if fill == "one copy":
            every_window = _all_windows(grouped_x[lo:hi], kernel, stride, dilation)
            chunk.view(n, groups, cg, *kernel, *out_size).copy_(every_window)
        elif fill == "padded chunks":
            padded[:n][inside].copy_(grouped_x[lo:hi])
            every_window = _all_windows(padded[:n], kernel, stride, dilation)
            chunk.view(n, groups, cg, *kernel, *out_size).copy_(every_window)
        else:
            samples = grouped_x[lo:hi]
            for j, clipped, target, source in windows:
                if clipped:
                    chunk[:, :, :, j].zero_()
                if target is not None:
                    chunk[(*all_positions, j, *target)].copy_(samples[(*all_positions, *source)])
        # (n*G, C_in/G * k, L) @ (n*G, L, C_out/G): the transposed view of the output
        # gradient is a valid operand as it is.
        patches = chunk.view(n * groups, rows, positions)
        g = grads[: n * groups * rows * og].view(n * groups, rows, og)
        torch.bmm(patches, delta[lo * groups : hi * groups].transpose(1, 2), out=g)
        flat = g.view(n, -1)
        dots.append(rows_times(flat, flat_weight))
        sq_norms.append(row_sq_norm(flat))
        if grad_sum is not None:
            grad_sum += g.view(n, groups, rows, og).sum(0)
        if sum_sq is not None:
            sum_sq += g.square_().view(n, groups, rows, og).sum(0)

    def to_weight(t: Tensor | None) -> Tensor | None:
        """``(G, C_in/G * k, C_out/G)`` -> the weight's ``(G*C_out/G, C_in/G, *kernel)``."""
        if t is None:
            return None
        return t.transpose(1, 2).reshape(weight.shape)

    dot = dots[0] if len(dots) == 1 else torch.cat(dots)
    sq_norm = sq_norms[0] if len(sq_norms) == 1 else torch.cat(sq_norms)
    return dot, sq_norm, to_weight(sum_sq), to_weight(grad_sum)


def _all_windows(
    x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> Tensor:
    """Every kernel offset's window of ``x`` ``(n, G, C_in/G, *S)`` (already padded), as a
    view ``(n, G, C_in/G, *kernel, *L)``."""
    nd = len(kernel)
    for d in range(nd):
        x = x.unfold(3 + d, dilation[d] * (kernel[d] - 1) + 1, stride[d])
        if dilation[d] > 1:
            x = x[..., :: dilation[d]]
    return x.permute(0, 1, 2, *range(3 + nd, 3 + 2 * nd), *range(3, 3 + nd))


def _zero_borders(out: Tensor, before: tuple[int, ...], size: list[int]) -> None:
    """Zero the ``before[d]`` positions on both sides of each spatial dim of ``out``
    ``(n, G, C_in/G, *S_padded)``, around an input of spatial ``size``."""
    everything = slice(None)
    for d, (pad, n) in enumerate(zip(before, size, strict=True)):
        if pad:
            lead = (everything,) * (3 + d)
            out[(*lead, slice(0, pad))].zero_()
            out[(*lead, slice(pad + n, None))].zero_()


def needs_padding(conv: nn.modules.conv._ConvNd) -> bool:
    """Whether ``conv`` pads its input (numeric, or ``"same"`` on a kernel wider than one)."""
    if conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(dl * (k - 1) for k, dl in zip(conv.kernel_size, conv.dilation, strict=True))
    return any(conv.padding)


def _zero_padding_before(conv: nn.modules.conv._ConvNd) -> tuple[int, ...] | None:
    """The zero padding before each spatial dim (``"same"``: half the span, rounded down, as
    :func:`pad_input` pads), or ``None`` for a non-zero padding mode."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        return tuple(
            dl * (k - 1) // 2 for k, dl in zip(conv.kernel_size, conv.dilation, strict=True)
        )
    return tuple(conv.padding)


def _window(
    index: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
    before: tuple[int, ...],
    size: list[int],
    out_size: tuple[int, ...],
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """For kernel offset ``index``: the output positions whose input lies inside the unpadded
    input (the rest read zero padding) and the input positions they read, as slices per
    spatial dim; ``None`` when every position reads padding."""
    target, source = [], []
    for i, dl, s, pad, n_in, n_out in zip(
        index, dilation, stride, before, size, out_size, strict=True
    ):
        at = i * dl - pad  # input position read by output position 0
        lo = max(0, -(at // s))  # ceil(-at / s): the first position at or past input 0
        hi = min(n_out, (n_in - 1 - at) // s + 1)
        if hi <= lo:
            return None
        target.append(slice(lo, hi))
        start = at + s * lo
        source.append(slice(start, start + s * (hi - lo - 1) + 1, s))
    return tuple(target), tuple(source)


_WORKSPACES = threading.local()


def workspace(name: str, numel: int, like: Tensor) -> Tensor:
    """A flat buffer of at least ``numel`` elements in ``like``'s dtype and device, kept
    between calls (per thread) and grown as needed up to :data:`WINDOW_CHUNK_ELEMENTS`
    (larger ones are allocated each time): the chunked routes reuse it on every step instead
    of allocating fresh memory, whose pages the allocator may have handed back to the system
    (faulting them in again was measured to cost as much as the products on a CPU). Its
    contents are scratch. The convolution routes share three, by ``name``: ``"inputs"``
    (patches, or an input's Gram matrices), ``"products"`` (gradients, or the output
    gradient's) and ``"padded"`` (a chunk of zero-padded inputs)."""
    if numel > WINDOW_CHUNK_ELEMENTS:  # a chunk of one sample over the bound: not kept
        return like.new_empty(numel)
    buffers = _WORKSPACES.__dict__.setdefault("buffers", {})
    key = (name, like.device, like.dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = like.new_empty(numel)
    return buffer[:numel]
