"""The minimal rule: a function that returns per-sample gradients.

Supporting a layer type needs one function::

    @register_grad_sampler(MyLayer)
    def my_layer_grad_sample(
        module: MyLayer, inputs: tuple[Tensor, ...], grad_outputs: tuple[Tensor, ...]
    ) -> dict[str, Tensor]:
        (x,), (delta,) = inputs, grad_outputs
        return {"weight": torch.einsum("bo,bk->bok", delta, x)}

``inputs`` are the tensors the layer's ``forward`` received (positional arguments, sample
dim 0), ``grad_outputs`` the gradients of its output tensors (zeros for an output that does not
reach the loss), both in the statistics dtype. The function returns, for each of the layer's
own parameters (names as in ``module.named_parameters(recurse=False)``), the per-sample
gradients ``(B, *param.shape)`` of ``sum_i <grad_outputs_i, output_i>``: the same contract as
Opacus' ``register_grad_sampler``. The engine derives ``<g_i, theta>``, ``|g_i|^2``,
``sum_i g_i**2`` and ``sum_i g_i`` from them, calling the function on chunks of at most
``chunk_elements`` per-sample elements, so the whole batch's per-sample gradients are never
held at once.

A layer whose norms and inner products have a cheaper form than materialising may also
register that form with :func:`register_norm_sampler`; it is used on steps that need neither
``sum_i g_i**2`` nor the per-sample gradients themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._linalg import chunk_size, row_sq_norm
from .registry import (
    Call,
    LayerRule,
    ParamStats,
    RuleContext,
    SkipModule,
    add_rule,
    registered_rule,
)

#: ``(module, inputs, grad_outputs) -> {name: (B, *param.shape) per-sample gradients}``.
GradSampler = Callable[[Any, tuple[Tensor, ...], tuple[Tensor, ...]], dict[str, Tensor]]
#: ``(module, inputs, grad_outputs) -> {name: ((B,) <g_i, theta>, (B,) |g_i|^2)}``.
NormSampler = Callable[
    [Any, tuple[Tensor, ...], tuple[Tensor, ...]], dict[str, tuple[Tensor, Tensor]]
]


class GradSamplerRule(LayerRule):
    """A :class:`LayerRule` built from a per-sample gradient function (and optionally a norm
    function): see the module docstring."""

    def __init__(self, grad_sampler: GradSampler, norm_sampler: NormSampler | None = None):
        self.grad_sampler = grad_sampler
        self.norm_sampler = norm_sampler

    def compute(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats]:
        owned = self.owned_parameters(module)
        names = [n for n in owned if n in ctx.want]
        if ctx.batch_dim != 0:
            raise SkipModule(
                f"it sees samples along dim {ctx.batch_dim}, and its per-sample gradient "
                f"function reads them along dim 0; make the model batch-first"
            )
        live = [self._arguments(call, ctx) for call in calls]
        live = [a for a in live if a is not None]
        if not names or not live:
            return {}
        batch = live[0][1][0].shape[0]
        if any(grads[0].shape[0] != batch for _, grads in live):
            raise SkipModule("its calls in one forward saw different numbers of samples")
        if (
            self.norm_sampler is not None
            and len(live) == 1  # norms of several calls' gradients do not add
            and not ctx.need_sum_sq
            and not ctx.need_grad_sample
        ):
            return self._from_norms(module, live[0], names, batch, ctx)
        params = {n: owned[n].detach().to(ctx.dtype) for n in names}
        return self._materialised(module, live, names, params, batch, ctx)

    def _materialised(
        self,
        module: nn.Module,
        live: list[tuple[tuple[Any, ...], list[Tensor]]],
        names: list[str],
        params: dict[str, Tensor],
        batch: int,
        ctx: RuleContext,
    ) -> dict[str, ParamStats]:
        """Statistics from the per-sample gradients, formed a chunk of samples at a time."""
        elements = sum(p.numel() for p in params.values())
        step = chunk_size(batch, elements, ctx.chunk_elements)
        dots: dict[str, list[Tensor]] = {n: [] for n in names}
        sq_norms: dict[str, list[Tensor]] = {n: [] for n in names}
        samples: dict[str, list[Tensor]] = {n: [] for n in names}
        sum_sq: dict[str, Tensor] = {}
        grad_sum: dict[str, Tensor] = {}
        for lo in range(0, max(batch, 1), step):
            size = min(step, batch - lo)
            chunk = self._chunk_grad_sample(module, live, names, params, lo, size, batch)
            for n in names:
                flat = chunk[n].flatten(1)
                dots[n].append(flat @ params[n].reshape(-1))
                sq_norms[n].append(row_sq_norm(flat))
                if ctx.need_sum_sq:
                    sq, total = chunk[n].pow(2).sum(0), chunk[n].sum(0)
                    sum_sq[n] = sum_sq[n] + sq if n in sum_sq else sq
                    grad_sum[n] = grad_sum[n] + total if n in grad_sum else total
                if n in ctx.need_grad_sample:
                    samples[n].append(chunk[n])
        return {
            n: ParamStats(
                dot=torch.cat(dots[n]),
                sq_norm=torch.cat(sq_norms[n]),
                sum_sq=sum_sq.get(n),
                grad_sample=torch.cat(samples[n]) if n in ctx.need_grad_sample else None,
                grad_sum=grad_sum.get(n),
            )
            for n in names
        }

    @staticmethod
    def _arguments(call: Call, ctx: RuleContext) -> tuple[tuple[Any, ...], list[Tensor]] | None:
        """The call's inputs and output gradients in the statistics dtype (zeros for an
        output that does not reach the loss), or ``None`` when no gradient arrived."""
        if all(g is None for g in call.grads):
            return None
        if call.kwargs:
            raise SkipModule(
                "it was called with keyword arguments, and its per-sample gradient function "
                "receives the positional inputs only; pass them positionally"
            )
        inputs = tuple(
            x.to(ctx.dtype) if isinstance(x, Tensor) and x.is_floating_point() else x
            for x in call.args
        )
        grads = [
            (g if g is not None else torch.zeros_like(o)).to(ctx.dtype)
            for o, g in zip(call.outputs, call.grads, strict=True)
        ]
        if any(g.dim() == 0 for g in grads):
            raise SkipModule("an output has no sample dimension")
        return inputs, grads

    def _chunk_grad_sample(
        self,
        module: nn.Module,
        live: list[tuple[tuple[Any, ...], list[Tensor]]],
        names: list[str],
        params: dict[str, Tensor],
        lo: int,
        size: int,
        batch: int,
    ) -> dict[str, Tensor]:
        """Per-sample gradients of samples ``lo .. lo + size``, summed over the calls."""
        total: dict[str, Tensor] = {}
        for inputs, grads in live:
            result = self.grad_sampler(
                module,
                tuple(_narrow(x, lo, size, batch) for x in inputs),
                tuple(g.narrow(0, lo, size) for g in grads),
            )
            for n in names:
                if n not in result:
                    raise KeyError(
                        f"the per-sample gradient function {_name(self.grad_sampler)} for "
                        f"{type(module).__name__} returned no entry for parameter {n!r} "
                        f"(it returned {sorted(result)})"
                    )
                g = result[n]
                if tuple(g.shape) != (size, *params[n].shape):
                    raise ValueError(
                        f"the per-sample gradient function {_name(self.grad_sampler)} for "
                        f"{type(module).__name__} returned shape {tuple(g.shape)} for {n!r}; "
                        f"expected (B, *param.shape) = {(size, *params[n].shape)}"
                    )
                g = g.to(params[n].dtype)
                total[n] = total[n] + g if n in total else g
        return total

    def _from_norms(
        self,
        module: nn.Module,
        live: tuple[tuple[Any, ...], list[Tensor]],
        names: list[str],
        batch: int,
        ctx: RuleContext,
    ) -> dict[str, ParamStats]:
        """Statistics from the norm function, for one call."""
        assert self.norm_sampler is not None
        inputs, grads = live
        result = self.norm_sampler(module, inputs, tuple(grads))
        out = {}
        for n in names:
            dot, sq_norm = result[n]
            if dot.shape != (batch,) or sq_norm.shape != (batch,):
                raise ValueError(
                    f"the norm function {_name(self.norm_sampler)} for "
                    f"{type(module).__name__} returned shapes {tuple(dot.shape)} and "
                    f"{tuple(sq_norm.shape)} for {n!r}; expected ({batch},) for both"
                )
            out[n] = ParamStats(dot=dot.to(ctx.dtype), sq_norm=sq_norm.to(ctx.dtype))
        return out


def _narrow(x: Any, lo: int, size: int, batch: int) -> Any:
    """Samples ``lo .. lo + size`` of a per-sample input; anything else as it is."""
    if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == batch:
        return x.narrow(0, lo, size)
    return x


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def register_grad_sampler(
    *module_types: type[nn.Module],
) -> Callable[[GradSampler], GradSampler]:
    """Function decorator: compute ``module_types``' per-sample statistics from the
    per-sample gradients the function returns (see the module docstring for its contract).

    Replaces any rule registered before for these types, including a dedicated one.
    """

    def decorate(fn: GradSampler) -> GradSampler:
        for module_type in module_types:
            add_rule(module_type, GradSamplerRule(fn))
        return fn

    return decorate


def register_norm_sampler(
    *module_types: type[nn.Module],
) -> Callable[[NormSampler], NormSampler]:
    """Function decorator: an optional fast path for types registered with
    :func:`register_grad_sampler`, returning ``{name: ((B,) <g_i, theta>, (B,) |g_i|^2)}``
    from ``(module, inputs, grad_outputs)`` without materialising per-sample gradients. It is
    used on steps that need neither ``sum_i g_i**2`` nor per-sample gradients (a shared
    parameter), and for a module called once per forward."""

    def decorate(fn: NormSampler) -> NormSampler:
        for module_type in module_types:
            rule = registered_rule(module_type)
            if not isinstance(rule, GradSamplerRule):
                raise ValueError(
                    f"register_norm_sampler({module_type.__name__}): register its per-sample "
                    f"gradient function with @register_grad_sampler({module_type.__name__}) "
                    f"first; the norm function is a fast path beside it, not a rule of its own"
                )
            rule.norm_sampler = fn
        return fn

    return decorate
