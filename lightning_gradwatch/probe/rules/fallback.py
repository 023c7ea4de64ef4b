"""Generic rule for any module with parameters: per-sample vector-Jacobian products.

``G_i`` is the VJP of ``theta -> module(x_i; theta)`` at ``delta_i``, computed with
``torch.func.grad`` under ``torch.func.vmap`` over samples, from the captured inputs and output
gradients, in chunks of samples to bound memory. It is exact for every module that treats
samples independently and uses no randomness in its forward pass. A module that ``vmap``
refuses to replay (randomness, ``.item()``, data-dependent control flow, in-place updates of
buffers) is excluded with a warning; any other error propagates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._linalg import chunk_size, stats_from_grad_sample
from ..registry import Call, LayerRule, ParamStats, RuleContext, SkipModule

#: Messages of the errors by which ``torch.func.vmap`` refuses to replay a forward per sample:
#: randomness (dropout inside the module), ``.item()`` or data-dependent control flow, in-place
#: updates of unbatched buffers (e.g. running statistics), operators without a batching rule.
_VMAP_REFUSALS = ("vmap:", "Batching rule not implemented")


def _is_vmap_refusal(err: RuntimeError) -> bool:
    """Whether ``err`` is vmap refusing the replay, rather than a bug (which must propagate)."""
    message = str(err)
    return any(marker in message for marker in _VMAP_REFUSALS)


class FallbackRule(LayerRule):
    """Used for every module with direct trainable parameters and no dedicated rule."""

    def batch_dim(self, module: nn.Module) -> int:
        """Dimension of the module's tensor inputs and outputs that indexes samples."""
        return 0

    def sample_dims(
        self, module: nn.Module, call: Call, leaves: list[Any], bdim: int, batch: int
    ) -> list[int | None]:
        """For each leaf of ``(call.args, call.kwargs)`` (flattened), the dim that indexes
        samples, or ``None`` for a leaf shared by all samples: by default, a tensor with
        ``batch`` entries along ``bdim`` is per-sample and anything else is broadcast.
        Rules for modules whose inputs have several layouts override this."""
        return [
            bdim if isinstance(x, Tensor) and x.dim() > bdim and x.shape[bdim] == batch else None
            for x in leaves
        ]

    def compute(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats]:
        owned = self.owned_parameters(module)
        names = [n for n in owned if n in ctx.want]
        if not names:
            return {}
        params = {n: owned[n].detach().to(ctx.dtype) for n in names}
        # The module's own layout (sequence-first attention), else the one the probe found.
        bdim = self.batch_dim(module) or ctx.batch_dim
        totals: dict[str, Tensor] | None = None
        for call in calls:
            grad_sample = self._call_grad_sample(module, call, params, bdim, ctx)
            if grad_sample is None:
                continue
            if totals is None:
                totals = grad_sample
            else:  # several calls in one forward: per-sample gradients add
                if any(totals[n].shape != grad_sample[n].shape for n in names):
                    # Not broadcast: a call over fewer rows is not the same samples.
                    raise SkipModule("its calls in one forward saw different numbers of samples")
                totals = {n: totals[n] + grad_sample[n] for n in names}
        if totals is None:
            return {}
        return {
            n: stats_from_grad_sample(
                totals[n], params[n], ctx.need_sum_sq, n in ctx.need_grad_sample
            )
            for n in names
        }

    def _call_grad_sample(
        self,
        module: nn.Module,
        call: Call,
        params: dict[str, Tensor],
        bdim: int,
        ctx: RuleContext,
    ) -> dict[str, Tensor] | None:
        live = [(o, g) for o, g in zip(call.outputs, call.grads, strict=True) if g is not None]
        if not live:
            return None
        batch = live[0][1].shape[bdim] if live[0][1].dim() > bdim else -1
        if any(g.dim() <= bdim or g.shape[bdim] != batch for _, g in live):
            # E.g. an LSTM's (out, (h_n, c_n)): h_n is (layers, B, H), sample dim 1.
            shapes = [tuple(g.shape) for _, g in live]
            raise SkipModule(
                f"its outputs {shapes} do not all hold the samples along dim {bdim}, so the "
                f"sample dimension of each output is unknown; give it a dedicated rule"
            )
        deltas = [g.to(ctx.dtype) for _, g in live]
        live_index = [k for k, g in enumerate(call.grads) if g is not None]

        leaves, spec = tree_flatten((call.args, call.kwargs))
        leaf_dims = self.sample_dims(module, call, leaves, bdim, batch)
        batched = [d is not None for d in leaf_dims]
        dims = [d for d in leaf_dims if d is not None]
        leaves = [
            x.to(ctx.dtype) if isinstance(x, Tensor) and x.is_floating_point() else x
            for x in leaves
        ]
        per_sample = [x for x, b in zip(leaves, batched, strict=True) if b]

        def sample_loss(p: dict[str, Tensor], xs: list[Tensor], ds: list[Tensor]) -> Tensor:
            it = iter(x.unsqueeze(d) for x, d in zip(xs, dims, strict=True))
            full = [next(it) if b else x for x, b in zip(leaves, batched, strict=True)]
            args, kwargs = tree_unflatten(full, spec)
            out_leaves, _ = tree_flatten(functional_call(module, p, tuple(args), kwargs))
            outs = [o for o in out_leaves if isinstance(o, Tensor)]
            return sum(
                ((outs[k] * d.unsqueeze(bdim)).sum() for k, d in zip(live_index, ds, strict=True)),
                torch.zeros((), dtype=ctx.dtype, device=ds[0].device),
            )

        per_sample_grad = vmap(grad(sample_loss), in_dims=(None, dims, bdim))
        elements = sum(p.numel() for p in params.values())
        step = chunk_size(batch, elements, ctx.chunk_elements)
        pieces: list[dict[str, Tensor]] = []
        try:
            for lo in range(0, batch, step):
                xs = [
                    x.narrow(d, lo, min(step, batch - lo))
                    for x, d in zip(per_sample, dims, strict=True)
                ]
                ds = [d.narrow(bdim, lo, min(step, batch - lo)) for d in deltas]
                pieces.append(per_sample_grad(params, xs, ds))
        except RuntimeError as err:
            if not _is_vmap_refusal(err):
                raise
            raise SkipModule(f"its forward cannot be replayed per sample ({err})") from err
        return {n: torch.cat([piece[n] for piece in pieces]) for n in params}
