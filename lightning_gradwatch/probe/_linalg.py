"""Shared per-sample algebra for layers whose weight gradient is ``sum_t delta_t a_t^T``.

Linear layers, convolutions (after unfolding) and grouped convolutions all reduce to: inputs
``a`` of shape ``(B, T, G, K)`` and output gradients ``delta`` of shape ``(B, T, G, O)``, with
the per-sample weight gradient ``G_i[g] = sum_t delta[i, t, g]^T a[i, t, g]`` of shape
``(G, O, K)``. This module picks the cheapest exact route for its squared norm and sums.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import Call, ParamStats, SkipModule

#: Per-sample reductions of tensors up to this many elements run as an elementwise product
#: and a row sum. Inside the backward the first call of each distinct kernel in a step costs
#: several times its next (the backward's own kernels evict what its dispatch needs: 15-25 us
#: against 4-6 us, measured on a 2-core AMD EPYC), so on small tensors reusing the two kernels
#: every rule runs beats fewer passes through more kinds (``vector_norm``, a matrix-vector
#: product): about 30 us less per step in an ``nn.Linear`` head's rule, 20 in the assembly
#: of its statistics (GWA head mode, 512-wide MLP). On large operands the product's temporary
#: (a fresh allocation the size of the operand) costs more: 2-3x slower rules on the MLP's
#: 256 x 512 ones. The bound, 64 KiB in float32, keeps those temporaries well inside the
#: allocator's reused heap (below glibc's 128 KiB threshold for fresh mappings).
SMALL_ROWS_ELEMENTS = 2**14


def rowdot(x: Tensor, y: Tensor) -> Tensor:
    """Per-sample inner product of two real ``(B, ...)`` tensors: ``(B,)``. (What
    ``torch.linalg.vecdot`` runs, a product and a row sum, without its wrapper.)"""
    return (x.reshape(x.shape[0], -1) * y.reshape(y.shape[0], -1)).sum(1)


def row_sq_norm(x: Tensor) -> Tensor:
    """Per-sample squared norm of a ``(B, ...)`` tensor: ``(B,)``. Above
    :data:`SMALL_ROWS_ELEMENTS`, with no temporary the size of ``x`` (``x.pow(2).sum()``
    allocates one, which then costs more than the arithmetic)."""
    flat = x.reshape(x.shape[0], -1)
    if flat.numel() <= SMALL_ROWS_ELEMENTS:
        return (flat * flat).sum(1)
    return torch.linalg.vector_norm(flat, dim=1).square()


def rows_times(x: Tensor, v: Tensor) -> Tensor:
    """``x @ v`` for ``x`` ``(B, n)`` and ``v`` ``(n,)``: ``(B,)``, as a product and a row sum
    up to :data:`SMALL_ROWS_ELEMENTS` (see there), else a matrix-vector product."""
    if x.numel() <= SMALL_ROWS_ELEMENTS:
        return (x * v).sum(1)
    return x @ v


def sq_norm(v: Tensor) -> Tensor:
    """``v . v`` of a 1-D tensor: ``()``, as :func:`row_sq_norm` chooses its kernels."""
    if v.numel() <= SMALL_ROWS_ELEMENTS:
        return (v * v).sum()
    return torch.dot(v, v)


def chunk_size(batch: int, elements_per_sample: int, budget: int) -> int:
    """Largest number of samples whose per-sample tensors fit in ``budget`` elements (>= 1)."""
    return max(1, min(batch, budget // max(1, elements_per_sample)))


def stats_from_grad_sample(
    grad_sample: Tensor,
    weight: Tensor,
    need_sum_sq: bool,
    keep: bool,
    dot: Tensor | None = None,
) -> ParamStats:
    """Statistics from materialised per-sample gradients ``(B, *weight.shape)``; ``dot``, the
    inner products with ``weight`` ``(B,)``, where known already."""
    flat = grad_sample.flatten(1)
    return ParamStats(
        dot=flat @ weight.reshape(-1).to(flat.dtype) if dot is None else dot,
        sq_norm=row_sq_norm(flat),
        sum_sq=grad_sample.pow(2).sum(0) if need_sum_sq else None,
        grad_sample=grad_sample if keep else None,
        grad_sum=grad_sample.sum(0) if need_sum_sq else None,
    )


def outer_product_sum(a: Tensor, delta: Tensor) -> Tensor:
    """``sum_i G_i`` ``(G, O, K)`` for ``a`` ``(B, T, G, K)`` and ``delta`` ``(B, T, G, O)``, in
    their dtype (the batch gradient, consistent with the per-sample sums of squares)."""
    return torch.einsum("btgo,btgk->gok", delta, a)


#: Calibration of :func:`prefer_gram`, measured with ``torch.bmm`` in float32 on a 2-core AMD
#: EPYC CPU: the Gram products run at full speed only from about ``T = 64`` positions (below,
#: their ``T x T`` outputs are too small for the matrix kernels, and the speed falls roughly in
#: proportion to ``T``), and writing then re-reading one element of a materialised gradient
#: costs about as much as this many multiply-adds.
GRAM_FULL_SPEED_STEPS = 64
MATERIALISED_ELEMENT_COST = 11


def prefer_gram(steps: int, k_in: int, k_out: int) -> bool:
    """Whether the squared norm of ``sum_t d_t a_t^T`` over ``steps`` positions is cheaper from
    two ``T x T`` Gram matrices than from the materialised ``(k_out, k_in)`` gradient.

    Costs per sample and group, in multiply-adds: Gram ``T^2 (k_in + k_out)``, slowed by
    ``GRAM_FULL_SPEED_STEPS / T`` below that many positions; materialising ``T k_in k_out``
    plus ``MATERIALISED_ELEMENT_COST`` per gradient element for its write and read. Both routes
    are exact; this only picks the faster one.
    """
    gram = steps * steps * (k_in + k_out) * max(1.0, GRAM_FULL_SPEED_STEPS / steps)
    materialise = (steps + MATERIALISED_ELEMENT_COST) * k_in * k_out
    return gram < materialise


def outer_product_stats(
    a: Tensor,
    delta: Tensor,
    need_sum_sq: bool,
    need_grad_sample: bool,
    budget: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Squared norm (and optionally sum of squares / per-sample gradients) of
    ``G_i[g] = sum_t delta[i,t,g]^T a[i,t,g]``.

    Args:
        a: ``(B, T, G, K)`` layer inputs.
        delta: ``(B, T, G, O)`` unscaled per-sample output gradients.
        need_sum_sq: also return ``sum_i G_i**2``.
        need_grad_sample: also return ``G`` itself.
        budget: max elements of any temporary per-sample tensor (chunks over samples).

    Returns:
        ``sq_norm (B,)``, ``sum_sq (G, O, K) | None``, ``grad_sample (B, G, O, K) | None``.
    """
    sq_norm, sum_sq, grad_sample, _ = outer_product_moments(
        a, delta, need_sum_sq, need_grad_sample, budget, need_sum=False
    )
    return sq_norm, sum_sq, grad_sample


def outer_product_moments(
    a: Tensor,
    delta: Tensor,
    need_sum_sq: bool,
    need_grad_sample: bool,
    budget: int,
    need_sum: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """:func:`outer_product_stats` plus ``sum_i G_i`` ``(G, O, K)`` when ``need_sum`` and
    ``need_sum_sq``: where the per-sample gradients are materialised anyway, their sum costs
    one reduction instead of the weight-gradient-sized product of :func:`outer_product_sum`.

    Returns:
        ``sq_norm (B,)``, ``sum_sq | None``, ``grad_sample | None``, ``grad_sum | None``.
    """
    batch, steps, groups, k_in = a.shape
    k_out = delta.shape[-1]
    need_sum = need_sum and need_sum_sq
    if steps == 1 and not need_grad_sample:
        # Ghost norm: |d a^T|_F^2 = |d|^2 |a|^2, and sum_i (d_i a_i^T)**2 = (d**2)^T (a**2).
        a1, d1 = a[:, 0], delta[:, 0]
        if groups == 1:
            sq_norm = row_sq_norm(d1) * row_sq_norm(a1)
        else:
            d_sq = torch.linalg.vector_norm(d1, dim=-1).square()
            sq_norm = (d_sq * torch.linalg.vector_norm(a1, dim=-1).square()).sum(-1)
        sum_sq = None
        if need_sum_sq:
            sum_sq = (d1.pow(2).permute(1, 2, 0) @ a1.pow(2).permute(1, 0, 2)).contiguous()
        grad_sum = outer_product_sum(a, delta) if need_sum else None
        return sq_norm, sum_sq, None, grad_sum

    if not need_sum_sq and not need_grad_sample and prefer_gram(steps, k_in, k_out):
        # |G_i|^2 = sum_{t,s} (a_t . a_s)(d_t . d_s): two T x T Gram matrices per sample.
        sq_norm = a.new_empty(batch)
        step = chunk_size(batch, groups * steps * steps, budget)
        for lo in range(0, batch, step):
            if groups == 1:  # (n, T, K): no group axis to move, so no copy
                ac, dc = a[lo : lo + step, :, 0], delta[lo : lo + step, :, 0]
            else:
                ac = a[lo : lo + step].transpose(1, 2)  # (n, G, T, K)
                dc = delta[lo : lo + step].transpose(1, 2)
            gram_a = ac @ ac.transpose(-1, -2)
            gram_d = dc @ dc.transpose(-1, -2)
            sq_norm[lo : lo + step] = rowdot(gram_a, gram_d)
        return sq_norm, None, None, None

    # The products run faster with the shorter side as their rows (measured on a CPU: up to
    # 5x for a 1-D convolution's (B, 40, 5) patches), so G_i^T = a_i^T d_i is formed when
    # k_in < k_out, unless the per-sample gradients themselves are kept (in G_i's layout).
    transpose = k_in < k_out and not need_grad_sample
    shape = (groups, k_in, k_out) if transpose else (groups, k_out, k_in)
    sq_norm = a.new_empty(batch)
    sum_sq = a.new_zeros(shape) if need_sum_sq else None
    grad_sum = a.new_zeros(shape) if need_sum else None
    grad_sample = a.new_empty(batch, groups, k_out, k_in) if need_grad_sample else None
    step = chunk_size(batch, groups * k_out * k_in, budget)
    for lo in range(0, batch, step):
        if groups == 1:  # (n, T, K): no group axis to move, so a plain batched product
            ac, dc = a[lo : lo + step, :, 0], delta[lo : lo + step, :, 0]
        else:
            ac = a[lo : lo + step].transpose(1, 2)  # (n, G, T, K)
            dc = delta[lo : lo + step].transpose(1, 2)  # (n, G, T, O)
        g = ac.transpose(-1, -2) @ dc if transpose else dc.transpose(-1, -2) @ ac
        if groups == 1:
            g = g.unsqueeze(1)  # (n, 1, K, O) or (n, 1, O, K)
        sq_norm[lo : lo + step] = row_sq_norm(g)
        if grad_sum is not None:
            grad_sum += g.sum(0)
        if grad_sample is not None:
            grad_sample[lo : lo + step] = g
        if sum_sq is not None:  # g is the product's own fresh buffer (copied out above)
            sum_sq += g.square_().sum(0)
    if transpose:  # back to the weight's (G, O, K) layout
        sum_sq = sum_sq.transpose(-1, -2).contiguous() if sum_sq is not None else None
        grad_sum = grad_sum.transpose(-1, -2).contiguous() if grad_sum is not None else None
    return sq_norm, sum_sq, grad_sample, grad_sum


def bias_stats(
    delta_sum: Tensor, bias: Tensor, need_sum_sq: bool, keep: bool, dot: Tensor | None = None
) -> ParamStats:
    """Statistics of a bias whose per-sample gradient is ``delta_sum`` ``(B, *bias.shape)``;
    ``dot``: its inner products with ``bias`` ``(B,)`` where the rule formed them already."""
    return stats_from_grad_sample(delta_sum, bias, need_sum_sq, keep, dot)


def require_one_batch(calls: list[Call], batch_dim: int = 0) -> None:
    """Refuse (:class:`SkipModule`) calls of one module that saw different numbers of samples.

    A module called on a subset of the batch and on the whole batch in one forward (or on two
    subsets) has no per-sample gradient: the rows of one call are not the samples of another.
    Only calls whose first output received a gradient are compared, along ``batch_dim`` of
    their first argument.
    """
    sizes = {
        tuple(call.args[0].shape)
        for call in calls
        if call.grads and call.grads[0] is not None and isinstance(call.args[0], Tensor)
    }
    counts = {shape[batch_dim] for shape in sizes if len(shape) > batch_dim}
    if len(counts) > 1:
        raise SkipModule(
            f"its calls in one forward saw different numbers of samples (input shapes "
            f"{sorted(sizes)}), so their rows are not the same samples"
        )
