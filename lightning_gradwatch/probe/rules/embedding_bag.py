"""``nn.EmbeddingBag``: one sample per bag, in every mode.

Sample ``b``'s gradient is sparse. In ``"sum"`` and ``"mean"`` mode, row ``k`` of ``G_b`` is
``C_bk delta_b``, where ``C_bk`` sums the coefficients of the bag's entries that look up row
``k`` (``1``, the entry's ``per_sample_weights`` value, or ``1/n_b`` in mean mode, with
``n_b`` the bag's entries other than ``padding_idx``, which are left out of the bag). In
``"max"`` mode, entry ``(k, d)`` of ``G_b`` is ``delta_bd`` where row ``k`` holds the bag's
maximum in column ``d`` (the kernel's own ``max_indices``, so ties resolve as in its
backward). Both are segment sums over (bag, row) pairs, so repeated indices are summed before
squaring and nothing of size ``B x V`` is formed. ``<G_b, W> = delta_b . out_b`` in every mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._linalg import rowdot
from ..registry import Call, LayerRule, ParamStats, RuleContext, SkipModule, register_rule
from .embedding import frequency_scaling_reason, segment_sum

_MAX_MODE = 2  # torch.embedding_bag's code for mode="max"


@register_rule(nn.EmbeddingBag)
class EmbeddingBagRule(LayerRule):
    """Exact per-sample statistics of ``nn.EmbeddingBag.weight``; each bag is a sample."""

    def check(self, module: nn.Module) -> str | None:
        if type(module).forward is not nn.EmbeddingBag.forward:
            return (
                "it overrides the forward of nn.EmbeddingBag, so the rule's bag arithmetic "
                "would not be its computation; give it a rule of its own, or call a plain "
                "nn.EmbeddingBag inside it"
            )
        return frequency_scaling_reason(module)

    def compute(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats]:
        assert isinstance(module, nn.EmbeddingBag)
        if "weight" not in ctx.want:
            return {}
        weight = module.weight.detach().to(ctx.dtype)
        vocab, dim = weight.shape
        dots: list[Tensor] = []
        # sum/mean: (bag, row, value (D,)) per looked-up entry; max: (bag, flat position in
        # the weight, scalar value) per (bag, column).
        row_keys: list[Tensor] = []
        row_values: list[Tensor] = []
        cell_keys: list[Tensor] = []
        cell_values: list[Tensor] = []
        batch: int | None = None
        for call in calls:
            grad = call.grads[0]
            if grad is None:
                continue
            indices, offsets, per_sample_weights = _arguments(call)
            delta = grad.to(ctx.dtype)
            if batch is not None and delta.shape[0] != batch:
                raise SkipModule(
                    f"its calls in one forward saw different numbers of bags "
                    f"({batch} and {delta.shape[0]})"
                )
            batch = delta.shape[0]
            flat, bounds = _flat_bags(indices, offsets, batch)
            # 2-D input is cut into bags by the module itself, never with a last offset.
            last_offset = module.include_last_offset and indices.dim() == 1
            if last_offset and bool(bounds[batch] != flat.numel()):
                # PyTorch's modes disagree on such entries (max and mean's divisor count them,
                # sum does not), so no rule can follow the kernel.
                raise SkipModule(
                    "with include_last_offset=True its last offset is not len(input), so some "
                    "entries lie past the last bag, where PyTorch's modes disagree; make "
                    "offsets[-1] equal len(input)"
                )
            positions = torch.arange(flat.numel(), device=flat.device)
            bag = torch.searchsorted(bounds[:batch].to(torch.int64), positions, right=True) - 1
            valid = None if module.padding_idx is None else flat != module.padding_idx

            if call.output_intact():
                out = call.outputs[0].to(ctx.dtype)
            else:  # an in-place op overwrote the output after the forward: recompute it
                out = _bag_forward(module, weight, flat, bounds, last_offset, per_sample_weights)
            dots.append(rowdot(delta, out))

            if module.mode == "max":
                max_rows, bag_size = _max_rows(module, flat, bounds, last_offset)
                columns = torch.arange(dim, device=flat.device)
                position = max_rows * dim + columns  # (B, D) flat index into the weight
                keys = torch.arange(batch, device=flat.device)[:, None] * (vocab * dim) + position
                # An empty bag's output is 0 and sends no gradient; its max_indices point at row
                # 0 and are given zero values rather than dropped (no data-dependent shapes).
                nonempty = (bag_size > 0).to(ctx.dtype)[:, None]
                cell_keys.append(keys.reshape(-1))
                cell_values.append((delta * nonempty).reshape(-1))
                continue

            coef = torch.ones(flat.shape, dtype=ctx.dtype, device=flat.device)
            if per_sample_weights is not None:
                coef = per_sample_weights.reshape(-1).to(ctx.dtype)
            # Padding entries are left out of their bag: a zero coefficient, and no count.
            member = torch.ones_like(coef) if valid is None else valid.to(ctx.dtype)
            coef = coef * member
            if module.mode == "mean":
                count = torch.zeros(batch, dtype=ctx.dtype, device=flat.device)
                count.index_add_(0, bag, member)
                coef = coef / count[bag].clamp_min(1)  # an all-padding bag has coefficients 0
            row_keys.append(bag * vocab + flat.to(torch.int64))
            row_values.append(coef[:, None] * delta[bag])
        if batch is None:
            return {}

        sq_norm = weight.new_zeros(batch)
        sum_sq = weight.new_zeros(vocab, dim) if ctx.need_sum_sq else None
        # The batch gradient from the same per-sample terms as sum_sq (consistent under 16-bit).
        grad_sum = weight.new_zeros(vocab, dim) if ctx.need_sum_sq else None
        keep = "weight" in ctx.need_grad_sample
        grad_sample = weight.new_zeros(batch, vocab, dim) if keep else None
        if row_keys:
            keys, values = segment_sum(torch.cat(row_keys), torch.cat(row_values))
            squares = values.pow(2)
            sq_norm.index_add_(0, torch.div(keys, vocab, rounding_mode="floor"), squares.sum(1))
            if sum_sq is not None:
                sum_sq.index_add_(0, keys % vocab, squares)
            if grad_sum is not None:
                grad_sum.index_add_(0, keys % vocab, values)
            if grad_sample is not None:
                grad_sample.view(batch * vocab, dim).index_add_(0, keys, values)
        if cell_keys:
            keys, values = segment_sum(torch.cat(cell_keys), torch.cat(cell_values))
            squares = values.pow(2)
            size = vocab * dim
            sq_norm.index_add_(0, torch.div(keys, size, rounding_mode="floor"), squares)
            if sum_sq is not None:
                sum_sq.view(-1).index_add_(0, keys % size, squares)
            if grad_sum is not None:
                grad_sum.view(-1).index_add_(0, keys % size, values)
            if grad_sample is not None:
                grad_sample.view(-1).index_add_(0, keys, values)
        return {
            "weight": ParamStats(
                dot=torch.stack(dots).sum(0),
                sq_norm=sq_norm,
                sum_sq=sum_sq,
                grad_sample=grad_sample,
                grad_sum=grad_sum,
            )
        }


def _arguments(call: Call) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(input, offsets, per_sample_weights)`` of one ``EmbeddingBag.forward`` call."""
    names = ("input", "offsets", "per_sample_weights")
    bound = dict(zip(names, call.args, strict=False))
    bound.update({k: v for k, v in call.kwargs.items() if k in names})
    return bound["input"], bound.get("offsets"), bound.get("per_sample_weights")


def _flat_bags(indices: Tensor, offsets: Tensor | None, batch: int) -> tuple[Tensor, Tensor]:
    """Flattened indices ``(n,)`` and the bag boundaries as the module received them: each
    bag's first entry ``(B,)``, followed by the end of the last bag with
    ``include_last_offset=True`` (``(B + 1,)``)."""
    if indices.dim() == 2:
        # Every row is a bag of the same length (offsets are not allowed with 2-D input).
        width = indices.shape[1]
        return indices.reshape(-1), torch.arange(batch, device=indices.device) * width
    assert offsets is not None, "nn.EmbeddingBag requires offsets with 1-D input"
    return indices, offsets


def _bag_forward(
    module: nn.EmbeddingBag,
    weight: Tensor,
    flat: Tensor,
    bounds: Tensor,
    include_last_offset: bool,
    per_sample_weights: Tensor | None,
) -> Tensor:
    """The module's output ``(B, D)`` from ``weight`` (for when the captured one was modified)."""
    if per_sample_weights is not None:
        per_sample_weights = per_sample_weights.reshape(-1).to(weight.dtype)
    return F.embedding_bag(
        flat,
        weight,
        bounds,
        mode=module.mode,
        per_sample_weights=per_sample_weights,
        include_last_offset=include_last_offset,
        padding_idx=module.padding_idx,
    )


def _max_rows(
    module: nn.EmbeddingBag, flat: Tensor, bounds: Tensor, include_last_offset: bool
) -> tuple[Tensor, Tensor]:
    """The kernel's ``max_indices`` ``(B, D)`` (the row holding each column's maximum) and each
    bag's size ``(B,)``, from the module's own weight so ties resolve as in its forward."""
    _, _, bag_size, max_indices = torch.embedding_bag(
        module.weight.detach(),
        flat,
        bounds,
        False,
        _MAX_MODE,
        False,
        None,
        include_last_offset,
        module.padding_idx,  # None: no padding (a negative value would count from the end)
    )
    return max_indices, bag_size
