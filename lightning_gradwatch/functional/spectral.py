"""Spectral quantities of weight and gradient matrices: pure tensor functions.

Conventions:

- A weight of any rank >= 2 is read as a matrix ``out x rest`` (:func:`as_matrix`): the output
  dimension becomes the rows and every other dimension is flattened, in memory order, into
  the columns. For ``ConvNd`` weights ``(out, in/groups, *kernel)`` that is
  ``(out, in/groups * prod(kernel))``, the convention of
  ``torch.nn.utils.parametrizations.spectral_norm``. Transposed convolutions keep their output
  channels in dimension 1, so pass ``output_dim=1``.
- ``sigma_max`` is the spectral norm (largest singular value), not its square (WeightWatcher
  calls the square "spectral_norm"; we do not).
- The reshaped-matrix norm of a convolution is not the operator norm of the convolution; that
  one is :func:`conv_operator_norm_fft` (Sedghi, Gupta, Long, ICLR 2019).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "as_matrix",
    "compute_dtype",
    "conv_operator_norm_fft",
    "effective_rank",
    "gradient_spectrum",
    "init_power_iteration_vectors",
    "log_lipschitz_upper_bound",
    "nuclear_norm",
    "power_iteration",
    "stable_rank",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype spectral math runs in: float64 stays float64, anything narrower is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_matrix(weight: Tensor, output_dim: int = 0) -> Tensor:
    """Read a weight as a matrix ``out x rest``.

    Args:
        weight: ``(d_0, d_1, ...)`` with at least 2 dimensions. Linear ``(out, in)`` and
            Embedding ``(num_embeddings, dim)`` are returned unchanged; ConvNd
            ``(out, in/groups, k_1, ..., k_n)`` becomes ``(out, in/groups * k_1 * ... * k_n)``.
        output_dim: the dimension holding the output channels (1 for ``ConvTransposeNd``,
            whose weight is ``(in, out/groups, *kernel)``).

    Returns:
        ``(weight.shape[output_dim], numel / weight.shape[output_dim])``; a view when
        ``output_dim == 0`` and the weight is contiguous.
    """
    if weight.dim() < 2:
        raise ValueError(
            f"a spectral norm needs a matrix, got a tensor of shape {tuple(weight.shape)}; "
            f"select only weights with 2 or more dimensions"
        )
    if output_dim != 0:
        weight = weight.movedim(output_dim, 0)
    return weight.reshape(weight.shape[0], -1)


def init_power_iteration_vectors(
    rows: int,
    cols: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Random unit starting vectors ``u (rows,)`` and ``v (cols,)``.

    They are drawn on the CPU from ``generator`` (never from the global RNG, so monitoring does
    not shift the random stream that dropout or data shuffling use) and then moved to
    ``device``: the same generator state gives the same vectors on every device.
    """
    u = torch.randn(rows, generator=generator, dtype=torch.float64)
    v = torch.randn(cols, generator=generator, dtype=torch.float64)
    u, v = u / u.norm(), v / v.norm()
    return u.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)


def power_iteration(
    matrix: Tensor, u: Tensor, v: Tensor, n_iterations: int = 1, eps: float = 1e-12
) -> tuple[Tensor, Tensor, Tensor]:
    """Warm-started power iteration for the largest singular value.

    One iteration is ``v <- W^T u / |W^T u|``, ``u <- W v / |W v|``, as in
    ``torch.nn.utils.parametrizations.spectral_norm``. The estimate is ``sigma = u^T W v
    = |W v|``, which never exceeds the true ``sigma_max`` (up to rounding), so an error is
    always an underestimate.

    Args:
        matrix: ``(m, n)``.
        u: ``(m,)`` left vector from the previous call (or :func:`init_power_iteration_vectors`).
        v: ``(n,)`` right vector from the previous call. Only ``u`` feeds the first iteration;
            ``v`` is accepted so callers hold one pair of buffers.
        n_iterations: at least 1.
        eps: floor of the norms, so a zero matrix gives ``sigma = 0`` instead of NaN.

    Returns:
        ``(sigma (), u (m,), v (n,))``: new tensors, the inputs are not modified. Computed
        without autograd.
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    del v  # the next right vector is a function of u alone
    with torch.no_grad():
        matrix = matrix.detach()
        for _ in range(n_iterations):
            wt_u = matrix.mT @ u
            v = wt_u / wt_u.norm().clamp_min(eps)
            w_v = matrix @ v
            sigma = w_v.norm()
            u = w_v / sigma.clamp_min(eps)
    return sigma, u, v


def stable_rank(frobenius_sq: Tensor, sigma_max: Tensor) -> Tensor:
    """``|W|_F^2 / sigma_max^2``, in ``[1, rank(W)]`` for exact inputs; NaN-free: 0 for W = 0.

    Args:
        frobenius_sq: ``()`` squared Frobenius norm.
        sigma_max: ``()`` spectral norm (an underestimate makes the stable rank an
            overestimate).
    """
    denom = sigma_max.pow(2)
    tiny = torch.finfo(denom.dtype).tiny
    return torch.where(denom > 0, frobenius_sq / denom.clamp_min(tiny), torch.zeros_like(denom))


def nuclear_norm(singular_values: Tensor) -> Tensor:
    """``sum_k s_k`` over the last dimension. ``(..., k) -> (...)``."""
    return singular_values.sum(-1)


def effective_rank(singular_values: Tensor) -> Tensor:
    """Effective rank of Roy & Vetterli (2007): ``exp(-sum_k p_k log p_k)``, ``p_k = s_k/sum s``.

    It lies in ``[1, rank]`` for a nonzero matrix; ``0 log 0`` counts as 0. A zero matrix
    (all ``s_k = 0``) gets 0, matching its rank.

    Args:
        singular_values: ``(..., k)``, non-negative.

    Returns:
        ``(...)``.
    """
    total = singular_values.sum(-1, keepdim=True)
    p = singular_values / total.clamp_min(torch.finfo(singular_values.dtype).tiny)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    erank = entropy.exp()
    return torch.where(total.squeeze(-1) > 0, erank, torch.zeros_like(erank))


def gradient_spectrum(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Full-SVD summary of a (gradient) matrix: ``(sigma_max, nuclear_norm, effective_rank)``.

    Args:
        matrix: ``(m, n)``; computed in :func:`compute_dtype` of its dtype.

    Returns:
        Three ``()`` tensors on the matrix's device.
    """
    s = torch.linalg.svdvals(matrix.detach().to(compute_dtype(matrix.dtype)))
    return s[0], nuclear_norm(s), effective_rank(s)


def log_lipschitz_upper_bound(sigmas: Tensor) -> Tensor:
    """``log prod_l sigma_l = sum_l log sigma_l``: the log of the product of per-layer norms.

    Summing logs avoids the overflow of the product for deep networks. ``-inf`` if a layer
    has norm 0. For a chain of layers ``x -> act(W_l x)`` with 1-Lipschitz activations (ReLU,
    tanh, ...) this bounds the log of the network's Lipschitz constant (l2 to l2); residual
    connections, normalisation and attention break the bound.

    Args:
        sigmas: ``(L,)`` per-layer operator norms.
    """
    return sigmas.log().sum()


def _dilate(weight: Tensor, dilation: Sequence[int]) -> Tensor:
    """Insert ``dilation - 1`` zeros between kernel taps: a dilated conv is a plain conv with
    this sparse kernel."""
    if all(d == 1 for d in dilation):
        return weight
    k = weight.shape[2:]
    size = [(kk - 1) * d + 1 for kk, d in zip(k, dilation, strict=True)]
    out = weight.new_zeros((*weight.shape[:2], *size))
    index = (slice(None), slice(None), *(slice(None, None, d) for d in dilation))
    out[index] = weight
    return out


def conv_operator_norm_fft(
    weight: Tensor,
    grid_size: Sequence[int],
    *,
    groups: int = 1,
    dilation: Sequence[int] | int = 1,
) -> Tensor:
    """Operator norm (l2 -> l2) of a stride-1 *circular* convolution, by FFT.

    Sedghi, Gupta, Long, "The Singular Values of Convolutional Layers", ICLR 2019: the circular
    convolution on an ``n_1 x ... x n_d`` grid is block-diagonalised by the d-dimensional DFT, so
    its singular values are those of the ``out x in`` matrices ``K(w) = sum_t W[:, :, t]
    e^{-2 pi i <w, t/n>}`` over the ``prod(n)`` frequencies ``w``; the norm is their maximum.
    Cross-correlation (what PyTorch computes) has the same singular values.

    How it relates to a PyTorch ``ConvNd`` on inputs of spatial size ``n``:

    - ``padding_mode="circular"`` with ``2 * padding = dilation * (k - 1)`` and stride 1, grid
      ``n``: exact.
    - ``padding_mode="zeros"``, any stride, grid ``n + 2 * padding``: an upper bound (the
      layer is the circular convolution on that grid, restricted to zero-padded inputs and
      cropped/subsampled at the output, both of norm <= 1).

    Args:
        weight: ``(out, in/groups, k_1, ..., k_d)``.
        grid_size: ``(n_1, ..., n_d)``, each ``>= `` the (dilated) kernel size.
        groups: the conv's ``groups``; the operator is block diagonal over groups, so its norm
            is the largest block norm.
        dilation: the conv's ``dilation`` (int or per-dimension).

    Returns:
        ``()`` in the real dtype :func:`compute_dtype` of the weight.
    """
    spatial = weight.dim() - 2
    if spatial < 1:
        raise ValueError(f"expected a conv weight (out, in/groups, *kernel), got {weight.shape}")
    grid = tuple(int(n) for n in grid_size)
    if len(grid) != spatial:
        raise ValueError(f"grid_size has {len(grid)} dimensions, the kernel has {spatial}")
    dil = (dilation,) * spatial if isinstance(dilation, int) else tuple(dilation)
    with torch.no_grad():
        w = _dilate(weight.detach().to(compute_dtype(weight.dtype)), dil)
        if any(k > n for k, n in zip(w.shape[2:], grid, strict=True)):
            raise ValueError(
                f"the (dilated) kernel {tuple(w.shape[2:])} is larger than the grid {grid}; "
                f"a circular convolution needs grid_size >= kernel size in every dimension"
            )
        dims = tuple(range(2, 2 + spatial))
        transfer = torch.fft.fftn(w, s=grid, dim=dims)  # (out, in/g, *grid), complex
        out_channels = transfer.shape[0]
        if out_channels % groups:
            raise ValueError(f"out channels {out_channels} not divisible by groups={groups}")
        per_group = out_channels // groups
        # (groups, out/g, in/g, *grid) -> (groups * prod(grid), out/g, in/g)
        blocks = transfer.reshape(groups, per_group, transfer.shape[1], -1).permute(0, 3, 1, 2)
        return torch.linalg.svdvals(blocks).max()
