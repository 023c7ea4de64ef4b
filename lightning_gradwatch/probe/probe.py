"""``GradientProbe``: per-sample gradient statistics from forward and backward hooks."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from . import rules as _rules  # noqa: F401  (registers the layer rules)
from .registry import Call, LayerRule, ParamStats, RuleContext, SkipModule, rule_for
from .rules.fallback import FallbackRule
from .stats import ProbeStats

LossReduction = Literal["mean", "sum"]

_FALLBACK = FallbackRule()


class ParameterUseError(RuntimeError):
    """A tracked parameter is used in a way the probe cannot attribute to samples exactly."""


@dataclass
class _Owner:
    """A module whose rule computes statistics for some tracked parameters."""

    module: nn.Module
    module_name: str
    rule: LayerRule
    local_to_name: dict[str, str]  # local parameter name -> canonical name
    calls: list[Call] = field(default_factory=list)
    missing_grads: int = 0
    result: dict[str, ParamStats] | None = None
    skip_reason: str | None = None


class GradientProbe:
    """Exact per-sample gradient statistics, computed in hooks from activations and backprops.

    Hooks are attached only inside a ``with probe:`` block. After each backward pass inside
    the block, :attr:`stats` holds that backward's :class:`ProbeStats`. The probe never writes
    to ``.grad``, never changes a gradient, keeps no graph alive, and frees what it captured at
    the end of each backward.

    Example::

        >>> import torch, torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_gradwatch import GradientProbe
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
        >>> probe = GradientProbe(model)
        >>> with probe:
        ...     F.cross_entropy(model(x), y).backward()
        >>> probe.stats.alignment(["2.weight"]).shape
        torch.Size([5])

    Args:
        model: the module to watch.
        params: names (as in ``model.named_parameters()``) to track; ``None`` tracks every
            trainable parameter.
        loss_reduction: how the batch loss was reduced over samples: ``"mean"`` (``1/B``) or
            ``"sum"``. ``g_i`` is always the gradient of sample ``i``'s own loss.
        sum_grad_squared: also compute ``sum_i g_i**2`` and ``sum_i g_i`` per parameter.
        loss_scale: a further factor the loss was multiplied by before ``backward`` (an AMP
            ``GradScaler`` scale, ``1/accumulate_grad_batches``, ...), or a callable returning
            it, evaluated once per backward. Statistics are divided back by it.
        chunk_elements: bound on the elements of any per-sample tensor formed at once.
        verify: check on the first forward inside a block that every use of a tracked
            parameter happens inside a module whose rule accounts for it (``"first"``), on
            every forward (``"always"``), or never.

    Raises:
        ValueError: unknown parameter names, or a bad ``loss_reduction``.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[str] | None = None,
        loss_reduction: LossReduction = "mean",
        sum_grad_squared: bool = False,
        loss_scale: float | Callable[[], float] = 1.0,
        chunk_elements: int = 2**24,
        verify: Literal["first", "always", "never"] = "first",
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if verify not in ("first", "always", "never"):
            raise ValueError(f"verify must be 'first', 'always' or 'never', got {verify!r}")
        self.model = model
        self.loss_reduction: LossReduction = loss_reduction
        self.sum_grad_squared = sum_grad_squared
        self.loss_scale = loss_scale
        self.chunk_elements = chunk_elements
        self.verify = verify

        named = dict(model.named_parameters())
        if params is None:
            self.param_names = [n for n, p in named.items() if p.requires_grad]
        else:
            self.param_names = list(dict.fromkeys(params))
            unknown = [n for n in self.param_names if n not in named]
            if unknown:
                raise ValueError(
                    f"unknown parameter names {unknown}; pass names as listed by "
                    f"model.named_parameters(), e.g. {list(named)[:5]}"
                )
        self._params = {n: named[n] for n in self.param_names}
        self._owners = self._resolve_owners()
        owners_of: dict[str, int] = {}
        for owner in self._owners:
            for name in owner.local_to_name.values():
                owners_of[name] = owners_of.get(name, 0) + 1
        # A parameter owned by several modules (tied weights): their per-sample gradients are
        # materialised and summed before any norm is taken.
        self._shared = {n for n, k in owners_of.items() if k > 1}
        self._unowned = [n for n in self.param_names if n not in owners_of]

        self._handles: list[Any] = []
        self._active = False
        self._replaying = False
        self._finalize_queued = False
        self._verified = False
        self._grad_scale: float = 1.0
        self._grad_sum: dict[str, Tensor] = {}
        self._warned: set[str] = set()
        self._stats: ProbeStats | None = None
        self._listeners: list[Callable[[ProbeStats], None]] = []
        self.skipped_backwards = 0

    # ------------------------------------------------------------------ ownership
    def _resolve_owners(self) -> list[_Owner]:
        canonical = {id(p): n for n, p in self._params.items()}
        owners: list[_Owner] = []
        claimed_by_recursive: set[int] = set()
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            if id(module) in claimed_by_recursive:
                continue
            rule = rule_for(module)
            if rule is None:
                if not any(True for _ in module.parameters(recurse=False)):
                    continue
                rule = _FALLBACK
            if rule.recursive:
                claimed_by_recursive.update(id(m) for m in module.modules() if m is not module)
            local = {
                local_name: canonical[id(p)]
                for local_name, p in rule.owned_parameters(module).items()
                if id(p) in canonical
            }
            if local and not any(o.module is module for o in owners):
                owners.append(_Owner(module, module_name, rule, local))
        return owners

    # ------------------------------------------------------------------ public API
    @property
    def stats(self) -> ProbeStats:
        """Statistics of the last backward pass inside a ``with`` block."""
        if self._stats is None:
            raise RuntimeError(
                "no statistics yet: run forward and backward inside `with probe:` first"
            )
        return self._stats

    @property
    def has_stats(self) -> bool:
        return self._stats is not None

    def add_listener(self, listener: Callable[[ProbeStats], None]) -> None:
        """Call ``listener(stats)`` at the end of every probed backward pass."""
        self._listeners.append(listener)

    def reset(self) -> None:
        """Forget the last statistics."""
        self._stats = None

    def __enter__(self) -> GradientProbe:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        """Register the hooks (what ``with probe:`` does on entry)."""
        if self._active:
            return
        self._active = True
        for owner in self._owners:
            self._handles.append(
                owner.module.register_forward_hook(
                    self._make_forward_hook(owner), with_kwargs=True
                )
            )
        if self.sum_grad_squared:
            for name, param in self._params.items():
                self._handles.append(param.register_hook(self._make_param_hook(name)))
        if self.verify == "always" or (self.verify == "first" and not self._verified):
            self._handles.append(_UseChecker(self))

    def detach(self) -> None:
        """Remove the hooks and drop anything captured (what leaving the block does)."""
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        self._clear_captures()
        self._active = False

    # ------------------------------------------------------------------ hooks
    def _make_forward_hook(self, owner: _Owner) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._replaying or not torch.is_grad_enabled():
                return
            outputs = [o for o in tree_flatten(output)[0] if isinstance(o, Tensor)]
            live = [k for k, o in enumerate(outputs) if o.requires_grad]
            if not live:
                return
            reason = owner.rule.check(module)
            if reason is not None:
                self._exclude(owner, reason)
                return
            call = Call(
                args=tree_map(_detach, args),
                kwargs=tree_map(_detach, kwargs),
                outputs=[o.detach() for o in outputs],
                output_versions=[o._version for o in outputs],
                grads=[None] * len(outputs),
            )
            owner.calls.append(call)
            owner.missing_grads += len(live)
            for k in live:
                outputs[k].register_hook(self._make_grad_hook(owner, call, k))

        return hook

    def _make_grad_hook(self, owner: _Owner, call: Call, k: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            self._start_backward()
            call.grads[k] = grad
            owner.missing_grads -= 1
            if owner.missing_grads == 0:
                # Every output of every call has its gradient: compute now and free early.
                self._compute(owner)

        return hook

    def _make_param_hook(self, name: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            self._start_backward()
            self._grad_sum[name] = grad

        return hook

    def _start_backward(self) -> None:
        if self._finalize_queued:
            return
        self._finalize_queued = True
        self._verified = True
        scale = self.loss_scale() if callable(self.loss_scale) else self.loss_scale
        self._grad_scale = float(scale)
        torch.autograd.Variable._execution_engine.queue_callback(self._finalize)

    def _grad_factor(self, batch: int) -> float:
        reduction = batch if self.loss_reduction == "mean" else 1
        return reduction / self._grad_scale

    # ------------------------------------------------------------------ computation
    def _compute(self, owner: _Owner) -> None:
        calls = [c for c in owner.calls if any(g is not None for g in c.grads)]
        owner.calls = []
        if not calls or owner.skip_reason is not None:
            return
        sample = next(g for c in calls for g in c.grads if g is not None)
        ctx = RuleContext(
            grad_factor=self._grad_factor,
            dtype=torch.promote_types(sample.dtype, torch.float32),
            want=frozenset(owner.local_to_name),
            need_sum_sq=self.sum_grad_squared,
            need_grad_sample=frozenset(
                local for local, name in owner.local_to_name.items() if name in self._shared
            ),
            chunk_elements=self.chunk_elements,
        )
        self._replaying = True
        try:
            result = owner.rule.compute(owner.module, calls, ctx)
        except SkipModule as skip:
            self._exclude(owner, skip.reason)
            return
        finally:
            self._replaying = False
        owner.result = {owner.local_to_name[local]: s for local, s in result.items()}

    def _exclude(self, owner: _Owner, reason: str) -> None:
        owner.skip_reason = reason
        owner.calls = []
        key = f"{type(owner.module).__name__}:{reason}"
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"lightning_gradwatch: {type(owner.module).__name__} '{owner.module_name}' is "
                f"left out of per-sample statistics: {reason}.",
                stacklevel=2,
            )

    def _finalize(self) -> None:
        try:
            for owner in self._owners:
                if owner.calls:
                    self._compute(owner)
            self._stats = self._assemble()
        finally:
            self._clear_captures()
        if not self._stats.is_finite():
            self.skipped_backwards += 1
        for listener in self._listeners:
            listener(self._stats)

    def _assemble(self) -> ProbeStats:
        contributions: dict[str, list[ParamStats]] = {}
        excluded: dict[str, str] = {}
        batch = None
        for owner in self._owners:
            if owner.skip_reason is not None:
                for name in owner.local_to_name.values():
                    excluded[name] = owner.skip_reason
            for name, s in (owner.result or {}).items():
                contributions.setdefault(name, []).append(s)
                batch = s.dot.shape[0] if batch is None else batch
        if batch is None:
            batch = 0
        stats = ProbeStats(batch_size=batch, excluded=excluded)
        for name in self.param_names:
            if name in excluded:
                continue
            param = self._params[name].detach()
            found = contributions.get(name)
            if not found:
                if name in self._unowned or batch == 0:
                    continue
                # Tracked but unused in this forward: every per-sample gradient is zero.
                dtype = torch.promote_types(param.dtype, torch.float32)
                zeros = torch.zeros(batch, dtype=dtype, device=param.device)
                found = [ParamStats(zeros, zeros, torch.zeros_like(param, dtype=dtype))]
            if len(found) == 1:
                s = found[0]
            else:
                grad_sample = torch.stack([f.grad_sample for f in found]).sum(0)
                flat = grad_sample.flatten(1)
                s = ParamStats(
                    dot=flat @ param.reshape(-1).to(flat.dtype),
                    sq_norm=flat.pow(2).sum(1),
                    sum_sq=grad_sample.pow(2).sum(0) if self.sum_grad_squared else None,
                )
            if s.dot.shape[0] != batch:
                excluded[name] = f"batch size {s.dot.shape[0]} differs from {batch}"
                continue
            stats.dot[name] = s.dot
            stats.sq_norm[name] = s.sq_norm
            stats.param_sq_norm[name] = param.to(s.dot.dtype).pow(2).sum()
            if self.sum_grad_squared and s.sum_sq is not None:
                stats.sum_sq[name] = s.sum_sq
                if name in self._grad_sum:
                    grad = self._grad_sum[name]
                    stats.grad_sum[name] = grad.to(s.sum_sq.dtype) * self._grad_factor(batch)
                else:
                    stats.grad_sum[name] = torch.zeros_like(s.sum_sq)
        for name in self._unowned:
            excluded.setdefault(name, "no module owns it as a direct parameter")
        return stats

    def _clear_captures(self) -> None:
        for owner in self._owners:
            owner.calls = []
            owner.missing_grads = 0
            owner.result = None
            owner.skip_reason = None
        self._grad_sum = {}
        self._finalize_queued = False


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


class _UseChecker(TorchFunctionMode):
    """Watches one forward pass for uses of tracked parameters that no rule accounts for.

    A use counts when a torch function takes the parameter and returns a tensor in the graph.
    It is accounted for when a module that owns the parameter is executing (on the module
    stack). A use inside another module's forward is refused; a use outside every module's
    forward (e.g. a weight penalty added to the loss) is not part of any sample's loss and is
    left out, with a warning.
    """

    def __init__(self, probe: GradientProbe) -> None:
        super().__init__()
        self.probe = probe
        self.by_id = {id(p): n for n, p in probe._params.items()}
        self.owners_of: dict[str, set[int]] = {}
        for owner in probe._owners:
            for name in owner.local_to_name.values():
                self.owners_of.setdefault(name, set()).add(id(owner.module))
        self.stack: list[nn.Module] = []
        self.names = {id(m): n for n, m in probe.model.named_modules(remove_duplicate=False)}
        pre = torch.nn.modules.module.register_module_forward_pre_hook(self._push)
        post = torch.nn.modules.module.register_module_forward_hook(self._pop)
        self._module_hooks = [pre, post]
        self.__enter__()

    def _push(self, module: nn.Module, args: Any) -> None:
        self.stack.append(module)

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def remove(self) -> None:
        for handle in self._module_hooks:
            handle.remove()
        self.__exit__(None, None, None)

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        probe = self.probe
        done = probe.verify == "first" and probe._verified
        if done or probe._finalize_queued or probe._replaying or not torch.is_grad_enabled():
            return result
        used = [
            self.by_id[id(x)]
            for x in tree_flatten((args, kwargs))[0]
            if isinstance(x, Tensor) and id(x) in self.by_id
        ]
        if not used or not any(
            isinstance(r, Tensor) and r.grad_fn is not None for r in tree_flatten(result)[0]
        ):
            return result
        on_stack = {id(m) for m in self.stack}
        for name in used:
            if self.owners_of.get(name, set()) & on_stack:
                continue
            if not self.stack:
                key = f"outside:{name}"
                if key not in self.probe._warned:
                    self.probe._warned.add(key)
                    warnings.warn(
                        f"lightning_gradwatch: parameter '{name}' is used outside any module's "
                        f"forward (for example a weight penalty added to the loss). That part "
                        f"of its gradient belongs to no sample and is left out of per-sample "
                        f"statistics.",
                        stacklevel=2,
                    )
                continue
            user = self.names.get(id(self.stack[-1]), type(self.stack[-1]).__name__)
            raise ParameterUseError(
                f"parameter '{name}' is used directly inside the forward of module "
                f"'{user}' ({type(self.stack[-1]).__name__}), which does not own it, so its "
                f"per-sample gradient cannot be attributed exactly. Either leave it out "
                f"(GradientProbe(params=[...]) without '{name}'), or call the owning module "
                f"instead of using its weight, or share the Parameter object itself "
                f"(module_b.weight = module_a.weight), which the probe handles exactly."
            )
        return result
