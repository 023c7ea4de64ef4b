"""``nn.Embedding``: sparse per-sample gradients, with repeated indices and ``padding_idx``.

Row ``k`` of ``G_i`` is the sum of ``delta_it`` over the positions where ``idx_it = k``. The
rule sums the backprops per (sample, row) pair with one ``index_add`` over the runs of equal
pairs in sorted order, so repeated indices are summed before squaring and nothing of size
``B x V`` is formed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._linalg import require_one_batch, rowdot, stats_from_grad_sample
from ..registry import Call, LayerRule, ParamStats, RuleContext, SkipModule, register_rule


def frequency_scaling_reason(module: nn.Module) -> str | None:
    """Why an embedding with ``scale_grad_by_freq=True`` has no per-sample gradient, or
    ``None``: the scaling counts each row's uses over the whole batch."""
    if getattr(module, "scale_grad_by_freq", False):
        return (
            "scale_grad_by_freq=True scales each row's gradient by its frequency in the "
            "whole batch, so a sample's gradient depends on the other samples"
        )
    return None


def segment_sum(keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct ``keys`` ``(m,)`` and the sum of ``values`` (``(m,)`` or ``(m, D)``) over
    each, padded to ``m`` segments: the segments past the number of distinct keys hold key 0
    and value 0, which add nothing wherever they are added.

    ``torch.unique`` would give exactly the distinct keys, but their number depends on the
    data, so it reads it to the host (a synchronisation on every step on an accelerator);
    sorting and numbering the runs of equal keys keeps every size fixed.
    """
    ordered, order = keys.sort()
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    segment = starts.cumsum(0) - 1  # the run of equal keys each sorted entry belongs to
    distinct = torch.zeros_like(ordered).scatter_(0, segment, ordered)
    sums = values.new_zeros(values.shape).index_add_(0, segment, values[order])
    return distinct, sums


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    positionwise = True

    def check(self, module: nn.Module) -> str | None:
        return frequency_scaling_reason(module)

    def compute(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats]:
        assert isinstance(module, nn.Embedding)
        if "weight" not in ctx.want:
            return {}
        weight = module.weight.detach().to(ctx.dtype)
        vocab, dim = weight.shape
        indices, deltas, dots = [], [], []
        require_one_batch(calls)
        for call in calls:
            idx, grad = call.args[0], call.grads[0]
            if grad is None:
                continue
            if idx.dim() < 1:
                raise SkipModule("a 0-d index has no sample dimension")
            batch = idx.shape[0]
            idx = idx.reshape(batch, -1)
            delta = grad.to(ctx.dtype).reshape(batch, -1, dim)
            if module.padding_idx is not None:
                # The padding row receives no gradient: drop those positions.
                delta = delta * (idx != module.padding_idx).unsqueeze(-1).to(delta.dtype)
            rows = (
                call.outputs[0].to(ctx.dtype).reshape(batch, -1, dim)
                if call.output_intact()
                else weight[idx]
            )
            dots.append(rowdot(delta, rows))
            indices.append(idx)
            deltas.append(delta)
        if not deltas:
            return {}
        idx = torch.cat(indices, 1)
        delta = torch.cat(deltas, 1)
        batch = idx.shape[0]
        dot = torch.stack(dots).sum(0)
        if "weight" in ctx.need_grad_sample:
            grad_sample = weight.new_zeros(batch, vocab, dim)
            grad_sample.view(batch * vocab, dim).index_add_(
                0,
                (idx + vocab * torch.arange(batch, device=idx.device)[:, None]).reshape(-1),
                delta.reshape(-1, dim),
            )
            stats = stats_from_grad_sample(grad_sample, weight, ctx.need_sum_sq, keep=True)
            stats.dot = dot
            return {"weight": stats}

        # One key per (sample, row); segment-sum the backprops over each key (padded to one
        # segment per position, so that no size depends on the data).
        keys = (idx + vocab * torch.arange(batch, device=idx.device)[:, None]).reshape(-1)
        unique_keys, segment = segment_sum(keys, delta.reshape(-1, dim))
        segment_sq = segment.pow(2)
        sq_norm = delta.new_zeros(batch).index_add_(
            0, torch.div(unique_keys, vocab, rounding_mode="floor"), segment_sq.sum(1)
        )
        sum_sq = grad_sum = None
        if ctx.need_sum_sq:
            rows = unique_keys % vocab
            sum_sq = weight.new_zeros(vocab, dim).index_add_(0, rows, segment_sq)
            grad_sum = weight.new_zeros(vocab, dim).index_add_(0, rows, segment)
        return {"weight": ParamStats(dot=dot, sq_norm=sq_norm, sum_sq=sum_sq, grad_sum=grad_sum)}
