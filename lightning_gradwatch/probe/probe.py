"""``GradientProbe``: per-sample gradient statistics from forward and backward hooks."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import rules as _rules  # noqa: F401  (registers the layer rules)
from .registry import (
    Call,
    LayerRule,
    ParamStats,
    RuleContext,
    SkipModule,
    registered_base,
    rule_for,
)
from .rules.fallback import FallbackRule
from .rules.parametrized import effective_tensor, parametrized_rule, reparametrized_tensors
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
    # The rule of the registered base class of a subclass that overrides ``forward`` (which
    # gets the fallback): its ``check`` still applies, e.g. batch statistics in BatchNorm.
    base_rule: LayerRule | None = None
    batch_dim: int = 0  # the dim of its inputs and outputs that indexes samples
    seen_shape: tuple[int, ...] | None = None  # first input's shape, for messages
    # Dims where the sample-dim check found the samples, when they contradict the dim the
    # rule reads them from itself (LayerRule.native_batch_dim).
    dim_conflict: list[int] | None = None
    # LayerRule.native_batch_dim of the module, asked once (it depends on the module's
    # configuration only, and a parametrized layer's answer builds a stand-in module).
    native_dim: int | None = None
    want: frozenset[str] = frozenset()  # RuleContext.want
    need_grad_sample: frozenset[str] = frozenset()  # RuleContext.need_grad_sample


class GradientProbe:
    """Exact per-sample gradient statistics, computed in hooks from activations and backprops.

    Hooks are attached only inside a ``with probe:`` block. After each backward pass inside
    the block, :attr:`stats` holds that backward's :class:`ProbeStats`. The probe never writes
    to ``.grad``, never changes a gradient, keeps no graph alive, and frees what it captured at
    the end of each backward.

    Samples are indexed by dim 0 of every module's input, except dim 1 for sequence-first
    ``nn.MultiheadAttention`` and for every submodule of a built-in transformer with
    ``batch_first=False``, and the dims declared in ``batch_dims``. The batch size ``B`` is
    ``batch_size`` (or :meth:`set_batch_size`) when given, else dim 0 of the first tensor the
    model's latest forward received. A module whose statistics have another number of samples
    (a subset of the batch, flattened positions, another layout) is left out with a warning
    and listed in ``stats.excluded``. A second backward through a graph kept with
    ``retain_graph=True`` is not probed (warning, no statistics).

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
        params: a name or names (as in ``model.named_parameters()``) to track; ``None``
            tracks every trainable parameter. A reparametrized tensor (``"fc.weight"`` of a
            layer with ``spectral_norm``, ``weight_norm``, ... ) may be named too: its ``g_i``
            is the gradient with respect to the effective tensor (see ``docs/probe.md``).
        loss_reduction: how the batch loss was reduced over samples: ``"mean"`` (``1/B``) or
            ``"sum"``. ``g_i`` is always the gradient of sample ``i``'s own loss.
        sum_grad_squared: also compute ``sum_i g_i**2`` and ``sum_i g_i`` per parameter.
        loss_scale: a further factor the loss was multiplied by before ``backward`` (an AMP
            ``GradScaler`` scale, ``1/accumulate_grad_batches``, ...), or a callable returning
            it, evaluated once per backward. Statistics are divided back by it. A ``()``
            tensor (a ``GradScaler``'s scale) is used on its device, without being read.
        chunk_elements: bound on the elements of any per-sample tensor formed at once.
        verify: check on the first forward inside a block that every use of a tracked
            parameter happens inside a module whose rule accounts for it (``"first"``), on
            every forward (``"always"``), or never.
        batch_size: the number of samples ``B`` of every step, when dim 0 of the model's
            first input is not it (a sequence-first model takes ``(T, B, ...)``); see also
            :meth:`set_batch_size`. Modules whose statistics have another number of samples
            are left out with a warning.
        batch_dims: module name (as in ``model.named_modules()``) to the dim of its inputs
            and outputs that indexes samples, for modules inside user code that transposes to
            sequence-first. Submodules of ``nn.Transformer``, ``nn.TransformerEncoder*`` and
            ``nn.TransformerDecoder*`` with ``batch_first=False`` get 1 without this.

    Raises:
        ValueError: unknown parameter names or module names, frozen parameters named in
            ``params``, a bad ``loss_reduction``, ``batch_size`` or ``batch_dims``, or
            ``sum_grad_squared`` with a reparametrized tensor named in ``params``.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[str] | None = None,
        loss_reduction: LossReduction = "mean",
        sum_grad_squared: bool = False,
        loss_scale: float | Tensor | Callable[[], float | Tensor] = 1.0,
        chunk_elements: int = 2**24,
        verify: Literal["first", "always", "never"] = "first",
        batch_size: int | None = None,
        batch_dims: dict[str, int] | None = None,
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
        if isinstance(params, str):  # one name, not an iterable of its characters
            params = [params]
        # A reparametrized tensor (the weight of a layer with spectral_norm, ...) may be named
        # too: its g_i is the gradient with respect to the effective tensor.
        reparametrized = reparametrized_tensors(model)
        if params is None:
            self.param_names = [n for n, p in named.items() if p.requires_grad]
        else:
            self.param_names = list(dict.fromkeys(params))
            unknown = [n for n in self.param_names if n not in named and n not in reparametrized]
            if unknown:
                raise ValueError(
                    f"unknown parameter names {unknown}; pass names as listed by "
                    f"model.named_parameters(), e.g. {list(named)[:5]}"
                )
            frozen = [n for n in self.param_names if n in named and not named[n].requires_grad]
            if frozen:
                raise ValueError(
                    f"parameters {frozen} are frozen (requires_grad=False), so they have no "
                    f"gradient to probe; unfreeze them (param.requires_grad_(True)) or leave "
                    f"them out of params"
                )
        self._params = {n: named[n] for n in self.param_names if n in named}
        self._effective = {
            n: (model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2])
            for n in self.param_names
            if n not in named
        }
        if self._effective and sum_grad_squared:
            raise ValueError(
                f"sum_grad_squared=True needs autograd's batch gradient of every tracked tensor, "
                f"which the reparametrized {list(self._effective)} (not leaves) do not have; "
                f"track their sources instead: "
                f"{[s for n in self._effective for s in reparametrized[n][1]]}"
            )
        self._batch_size: int | None = None
        self.set_batch_size(batch_size)
        self._owners = self._resolve_owners()
        module_dims = _builtin_batch_dims(model)
        if batch_dims:
            modules = dict(model.named_modules())
            bad = {n: d for n, d in batch_dims.items() if n not in modules or d < 0}
            if bad:
                raise ValueError(
                    f"batch_dims {bad}: keys must be module names as listed by "
                    f"model.named_modules() and values non-negative dims"
                )
            for name, dim in batch_dims.items():
                for module in modules[name].modules():
                    module_dims[id(module)] = dim
        self._declared_dims: set[int] = set()  # id(module): dims declared, never re-detected
        if batch_dims:
            self._declared_dims = {
                id(m) for name in batch_dims for m in dict(model.named_modules())[name].modules()
            }
        for owner in self._owners:
            owner.batch_dim = module_dims.get(id(owner.module), 0)
        owners_of: dict[str, int] = {}
        for owner in self._owners:
            for name in owner.local_to_name.values():
                owners_of[name] = owners_of.get(name, 0) + 1
        # A parameter owned by several modules (tied weights): their per-sample gradients are
        # materialised and summed before any norm is taken.
        self._shared = {n for n, k in owners_of.items() if k > 1}
        for owner in self._owners:  # what each rule computes, the same on every step
            owner.want = frozenset(owner.local_to_name)
            owner.need_grad_sample = frozenset(
                local for local, name in owner.local_to_name.items() if name in self._shared
            )
        self._unowned = [n for n in self.param_names if n not in owners_of]

        self._handles: list[Any] = []
        self._checker: _UseChecker | None = None
        self._dims_hook: Any = None  # the one-time sample-dim check's model forward hook
        self._active = False
        self._replaying = False
        self._finalize_queued = False
        self._incomplete = False
        self._model_batch: int | None = None  # dim 0 of the model's input, this step
        self._verified = False
        self._dims_checked = False
        self._grad_scale: float | Tensor = 1.0
        self._grad_sum: dict[str, Tensor] = {}
        # id(call) -> indices of outputs that are views hooked directly (see _hook_target).
        self._view_outputs: dict[int, set[int]] = {}
        self._warned: set[str] = set()
        self._stats: ProbeStats | None = None
        self._listeners: list[Callable[[ProbeStats], None]] = []
        # Backward passes with non-finite statistics: counted on the statistics' device, so
        # that no step waits for the device; read (once) by ``skipped_backwards``.
        self._skipped_counted = 0
        self._skipped_pending: Tensor | None = None

    # ------------------------------------------------------------------ ownership
    def _resolve_owners(self) -> list[_Owner]:
        canonical = {id(p): n for n, p in self._params.items()}
        owners: list[_Owner] = []
        claimed_by_recursive: set[int] = set()
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            if id(module) in claimed_by_recursive:
                continue
            # A module with parametrized tensors gets a rule that wraps its layer's own rule and
            # claims the parametrizations' submodules (see rules/parametrized.py).
            rule = parametrized_rule(module) or rule_for(module)
            base_rule = None
            if rule is None:
                if not any(True for _ in module.parameters(recurse=False)):
                    continue
                rule = _FALLBACK
                found = registered_base(module)
                base_rule = found[1] if found is not None else None
            if rule.recursive:
                claimed_by_recursive.update(id(m) for m in module.modules() if m is not module)
            local = {
                local_name: canonical[id(p)]
                for local_name, p in rule.owned_parameters(module).items()
                if id(p) in canonical
            }
            local.update({a: n for n, (m, a) in self._effective.items() if m is module})
            if local and not any(o.module is module for o in owners):
                owner = _Owner(module, module_name, rule, local, base_rule=base_rule)
                owner.native_dim = rule.native_batch_dim(module)
                owners.append(owner)
        return _drop_reregistered(owners)

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
        """Whether a probed backward pass has produced statistics since the last reset."""
        return self._stats is not None

    @property
    def active(self) -> bool:
        """Whether the hooks are attached (inside ``with probe:`` or after :meth:`attach`)."""
        return self._active

    def owners(self) -> list[tuple[nn.Module, dict[str, str]]]:
        """The probed modules: ``(module, {local name: name})`` pairs, one per module whose
        rule computes statistics, with each tracked parameter's name in the module
        (``module.named_parameters()``) and in the model (``model.named_parameters()``).
        A parameter shared by several modules appears under each."""
        return [(o.module, dict(o.local_to_name)) for o in self._owners]

    @property
    def skipped_backwards(self) -> int:
        """Probed backward passes whose statistics were not finite (NaN or Inf). Counted on
        the device; reading it synchronises once."""
        if self._skipped_pending is not None:
            self._skipped_counted += int(self._skipped_pending)
            self._skipped_pending = None
        return self._skipped_counted

    @skipped_backwards.setter
    def skipped_backwards(self, value: int) -> None:
        self._skipped_counted, self._skipped_pending = int(value), None

    def add_listener(self, listener: Callable[[ProbeStats], None]) -> None:
        """Call ``listener(stats)`` at the end of every probed backward pass."""
        self._listeners.append(listener)

    def set_batch_size(self, batch_size: int | None) -> None:
        """Declare the number of samples ``B`` of the coming steps (``None``: dim 0 of the
        model's first input, the default), e.g. from the batch in a training loop that knows
        it. Modules whose statistics have another number of samples are left out with a
        warning."""
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 0):
            raise ValueError(f"batch_size must be a non-negative int or None, got {batch_size!r}")
        self._batch_size = batch_size

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
        self._handles.append(
            self.model.register_forward_pre_hook(self._record_model_batch, with_kwargs=True)
        )
        for owner in self._owners:
            self._handles.append(
                owner.module.register_forward_hook(self._make_forward_hook(owner), with_kwargs=True)
            )
        if self.sum_grad_squared:
            for name, param in self._params.items():
                self._handles.append(param.register_hook(self._make_param_hook(name)))
        if self.verify == "always" or (self.verify == "first" and not self._verified):
            self._checker = _UseChecker(self)
            self._handles.append(self._checker)
        if self.verify != "never" and not self._dims_checked:
            self._dims_hook = self.model.register_forward_hook(
                self._check_sample_dims, with_kwargs=True
            )
            self._handles.append(self._dims_hook)

    def detach(self) -> None:
        """Remove the hooks and drop anything captured (what leaving the block does)."""
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        self._checker = self._dims_hook = None
        self._clear_captures()
        self._active = False

    def _retire_checks(self) -> None:
        """Remove the one-time checks once they are done, so that later forwards pay nothing
        for them: the use checker (a mode seen by every torch call) after the first probed
        backward with ``verify="first"``, and the sample-dim check after its replay."""
        checker = self._checker
        if checker is not None and self.verify == "first" and self._verified:
            # A mode can only leave the top of the stack; one entered after it (by the
            # user, inside the block) keeps it until detach, where it returns at once.
            current = getattr(torch.overrides, "_get_current_function_mode", lambda: None)
            if current() is checker:
                checker.remove()
                self._handles.remove(checker)
                self._checker = None
        if self._dims_hook is not None and self._dims_checked:
            self._dims_hook.remove()
            self._handles.remove(self._dims_hook)
            self._dims_hook = None

    # ------------------------------------------------------------------ hooks
    def _record_model_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # The latest forward with grad: a forward whose backward never came is superseded.
        if self._replaying or not torch.is_grad_enabled():
            return
        if self._checker is not None or self._dims_hook is not None:
            self._retire_checks()
        if args and isinstance(args[0], Tensor) and args[0].dim() > 0:
            self._model_batch = args[0].shape[0]  # the common case, without pytree
            return
        for leaf in tree_flatten((args, kwargs))[0]:
            if isinstance(leaf, Tensor) and leaf.dim() > 0:
                self._model_batch = leaf.shape[0]
                return

    def _check_sample_dims(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """On the first probed forward, find along which dim each module's input holds the
        samples, from evidence rather than shapes (which cannot tell ``(T, B)`` from
        ``(B, T)`` when ``T == B``).

        Replays the model forward without grad with sample 0 of its input changed (dim 0 of
        every batched tensor input: floats get 1 added, integers take sample 1's values), and
        compares each module's first input with the one it saw: the dim along which every
        change is confined to index 0 holds the samples. A module whose samples turn out to be
        along one other dim than assumed gets that dim (position-wise and generic rules use
        it; other rules refuse it with a warning). Without evidence (sample 0 does not reach
        the module, or the change is confined along several dims) the assumption stays. RNG
        states are restored and the replay runs on copies of the buffers, so training is
        unchanged; the cost is one forward
        pass without grad, once.
        """
        if self._replaying or not torch.is_grad_enabled() or self._dims_checked:
            return
        self._dims_checked = True
        leaves, spec = tree_flatten((args, kwargs))
        batch = self._model_batch
        if not batch or batch < 2 or (self._batch_size not in (None, batch)):
            return  # no sample 1 to copy, or the model's input is not batch-first
        perturbed = [_perturb_sample_zero(x, batch) for x in leaves]
        seen = {
            id(o.module): o.calls[0].args[0]
            for o in self._owners
            if o.calls and o.calls[0].args and isinstance(o.calls[0].args[0], Tensor)
        }
        replayed: dict[int, Tensor] = {}

        def record(module: nn.Module, module_args: tuple) -> None:
            first = module_args[0] if module_args else None
            if id(module) in seen and id(module) not in replayed and isinstance(first, Tensor):
                replayed[id(module)] = first.detach()

        # Buffers are replaced by copies for the replay: in-place updates (running statistics)
        # must not touch the originals, whose version counters autograd checks.
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        rng = torch.random.get_rng_state()
        devices = {x.device for x in leaves if isinstance(x, Tensor) and x.device.type != "cpu"}
        accel = {d: torch.get_device_module(d).get_rng_state(d) for d in devices}
        handles = [o.module.register_forward_pre_hook(record) for o in self._owners]
        self._replaying = True
        try:
            with torch.no_grad():
                new_args, new_kwargs = tree_unflatten(perturbed, spec)
                functional_call(model, buffers, tuple(new_args), new_kwargs)
        except Exception as err:
            # The changed input may be invalid for the model (offsets, lengths, index ranges
            # that must stay consistent): the check has no evidence, and training goes on with
            # the declared or built-in sample dims, which the user can state explicitly.
            replayed.clear()
            if "sample dims" not in self._warned:
                self._warned.add("sample dims")
                warnings.warn(
                    f"lightning_gradwatch: could not check along which dim each module sees "
                    f"the samples: the model's forward failed on a copy of the batch whose "
                    f"sample 0 was changed ({type(err).__name__}: {err}). Modules are taken "
                    f"to hold samples along dim 0 (dim 1 inside sequence-first transformers, "
                    f"batch_first for recurrent layers); if that is wrong for some module, "
                    f"declare it with GradientProbe(batch_dims={{'module.name': dim}}).",
                    stacklevel=2,
                )
        finally:
            self._replaying = False
            for handle in handles:
                handle.remove()
            torch.random.set_rng_state(rng)
            for device, state in accel.items():
                torch.get_device_module(device).set_rng_state(state, device)
        for owner in self._owners:
            if id(owner.module) in self._declared_dims:
                continue  # the user's declaration stands
            before, after = seen.get(id(owner.module)), replayed.get(id(owner.module))
            if before is None or after is None or before.shape != after.shape:
                continue
            found = _confined_dims(before, after, batch)
            native = owner.native_dim
            if found and native is not None:
                # The rule reads samples along its own dim: the evidence must agree with it.
                owner.dim_conflict = None if native in found else sorted(found)
                continue
            if not found or owner.batch_dim in found:
                continue  # no evidence (sample 0 did not reach it), or as assumed
            if len(found) == 1:
                # Position-wise and generic rules take it from here; other rules refuse it
                # (with a warning) when the step is computed.
                owner.batch_dim = found.pop()

    def _make_forward_hook(self, owner: _Owner) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._replaying or not torch.is_grad_enabled():
                return
            # The common case (tensor arguments, one tensor out) skips pytree traversal, which
            # costs more than the rest of the hook.
            flat = isinstance(output, Tensor) and not kwargs and all(map(_is_leaf, args))
            if flat:
                outputs = [output]
            else:
                outputs = [o for o in tree_flatten(output)[0] if isinstance(o, Tensor)]
            live = [k for k, o in enumerate(outputs) if o.requires_grad]
            if not live:
                return
            if all(outputs[k].numel() == 0 for k in live):
                # An empty batch (or empty sequence): no output element depends on the
                # parameters, so their per-sample gradients are zero (none for B = 0). Nothing
                # to capture, but the backward must still be seen to produce statistics.
                outputs[live[0]].register_hook(self._on_empty_output)
                return
            reason = owner.rule.check(module)
            if reason is None and owner.base_rule is not None:
                reason = owner.base_rule.check(module)
            if reason is not None:
                self._exclude(owner, reason)
                return
            call = Call(
                args=tuple(map(_detach, args)) if flat else tree_map(_detach, args),
                kwargs=tree_map(_detach, kwargs) if kwargs else {},
                outputs=[o.detach() for o in outputs],
                output_versions=[o._version for o in outputs],
                grads=[None] * len(outputs),
                state=owner.rule.capture(module),
            )
            owner.calls.append(call)
            owner.missing_grads += len(live)
            exposed = (
                {id(t) for t in (*args, output)}
                if flat
                else {id(t) for t in tree_flatten((args, kwargs, output))[0]}
            )
            for k in live:
                out = outputs[k]
                out.register_hook(self._make_grad_hook(owner, call, k))
                if not out._is_view():
                    continue
                base = _reshaped_base(out, exposed)
                if base is None:  # cannot be backed up: detect a lost hook at backward
                    self._view_outputs.setdefault(id(call), set()).add(k)
                else:
                    base.register_hook(self._make_grad_hook(owner, call, k, backup_shape=out.shape))

        return hook

    def _make_grad_hook(
        self, owner: _Owner, call: Call, k: int, backup_shape: torch.Size | None = None
    ) -> Callable[[Tensor], None]:
        """The hook collecting output ``k``'s gradient; with ``backup_shape``, the backup hook
        on a view output's base (see :func:`_reshaped_base`), which acts only when the view's
        own hook did not deliver (autograd runs the view's hook first when it is alive)."""

        def hook(grad: Tensor) -> None:
            self._start_backward()
            if backup_shape is not None:
                if not call.outputs or call.grads[k] is not None:
                    return  # the view's own hook delivered it
                grad = grad.reshape(backup_shape)
            if not call.outputs:  # released: its tensors are gone
                # A second backward through a graph kept with retain_graph=True reaches calls
                # that an earlier backward consumed: this backward cannot be probed.
                self._incomplete |= call.consumed
                return
            call.grads[k] = grad
            owner.missing_grads -= 1
            if owner.missing_grads == 0:
                # Every output of every call has its gradient: compute now and free early.
                self._compute(owner)

        return hook

    def _on_empty_output(self, grad: Tensor) -> None:
        self._start_backward()

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
        # A tensor (a GradScaler's scale) stays on its device: reading it would synchronise.
        self._grad_scale = scale if isinstance(scale, Tensor) else float(scale)
        torch.autograd.Variable._execution_engine.queue_callback(self._finalize)

    def _grad_factor(self, batch: int) -> float | Tensor:
        """The factor from autograd's backprops to unscaled per-sample losses: a Python
        float, or a ``()`` float64 tensor on the loss scale's device."""
        reduction = batch if self.loss_reduction == "mean" else 1
        if isinstance(self._grad_scale, Tensor):
            return reduction / self._grad_scale.detach().to(torch.float64)
        return reduction / self._grad_scale

    # ------------------------------------------------------------------ computation
    def _compute(self, owner: _Owner) -> None:
        for call in owner.calls:
            lost = [
                k
                for k in self._view_outputs.get(id(call), ())
                if call.grads[k] is None and not call.output_intact(k)
            ]
            if lost:
                # Autograd drops a hook registered on a view once the view is modified in
                # place, so this output's gradient never arrived: refuse rather than report 0.
                self._exclude(
                    owner,
                    "an in-place operation modified its output (a view) after the forward, "
                    "so autograd dropped the hook that collects its gradient; make that "
                    "operation out-of-place (e.g. inplace=False)",
                )
                return
        captured, owner.calls = owner.calls, []
        try:
            self._compute_calls(owner, captured)
        finally:
            for call in captured:
                _release(call, consumed=True)

    def _compute_calls(self, owner: _Owner, captured: list[Call]) -> None:
        calls = [c for c in captured if any(g is not None for g in c.grads)]
        if not calls or owner.skip_reason is not None:
            return
        sample = next(g for c in calls for g in c.grads if g is not None)
        owner.seen_shape = next(
            (tuple(a.shape) for c in calls for a in c.args if isinstance(a, Tensor)), None
        )
        batch_dim = owner.batch_dim
        if owner.native_dim is not None:
            batch_dim = 0  # the rule finds the sample dim itself
        if batch_dim != 0:
            if owner.rule.positionwise:
                calls = [_samples_first(c, batch_dim) for c in calls]
                batch_dim = 0
            elif not isinstance(owner.rule, FallbackRule):
                self._exclude(
                    owner,
                    f"it sees samples along dim {batch_dim} (input shape {owner.seen_shape}) "
                    f"and its rule needs them along dim 0; make the model batch-first",
                    kind="sample dim",
                )
                return
        ctx = RuleContext(
            dtype=torch.promote_types(sample.dtype, torch.float32),
            want=owner.want,
            need_sum_sq=self.sum_grad_squared,
            need_grad_sample=owner.need_grad_sample,
            chunk_elements=self.chunk_elements,
            batch_dim=batch_dim,
        )
        self._replaying = True
        try:
            result = owner.rule.compute(owner.module, calls, ctx)
        except SkipModule as skip:  # a deliberate refusal; any other error is a bug: propagate
            self._exclude(owner, skip.reason)
            return
        finally:
            self._replaying = False
        if owner.dim_conflict is not None:
            # After the rule's own refusals (e.g. an unbatched input), which say more.
            self._exclude(
                owner,
                f"it reads samples along dim {owner.native_dim} of its "
                f"input (shape {owner.seen_shape}), but the model's samples reach it along dim "
                f"{owner.dim_conflict[0]}; check its batch_first flag against the layout of the "
                f"tensor you pass it",
                kind="sample dim",
            )
            return
        coarse_sum = any(s.sum_sq is not None and s.grad_sum is None for s in result.values())
        if self.sum_grad_squared and sample.dtype.itemsize < 4 and coarse_sum:
            # Autograd's batch gradient is rounded to 16 bits here, and Q/B - (S/B)**2 would
            # cancel down to that rounding: refuse rather than report it.
            self._exclude(
                owner,
                f"its rule gives no float32 sum of per-sample gradients, and with "
                f"{sample.dtype} backprops autograd's batch gradient is too coarse for the "
                f"variance; train in precision='32-true' to monitor it, or leave it out "
                f"with params=[...]",
            )
            return
        owner.result = {owner.local_to_name[local]: self._unscale(s) for local, s in result.items()}

    def _unscale(self, s: ParamStats) -> ParamStats:
        """Rescale a rule's result from autograd's backprops to unscaled per-sample losses."""
        factor = self._grad_factor(s.dot.shape[0])
        if isinstance(factor, float) and factor == 1.0:
            return s
        s.dot.mul_(factor)
        s.sq_norm.mul_(factor * factor)
        if s.sum_sq is not None:
            s.sum_sq.mul_(factor * factor)
        if s.grad_sample is not None:
            s.grad_sample.mul_(factor)
        if s.grad_sum is not None:
            s.grad_sum.mul_(factor)
        return s

    def _tensor(self, name: str) -> Tensor:
        """The tracked tensor's current value: a parameter, or a reparametrized tensor
        recomputed without side effects."""
        if name in self._effective:
            module, attribute = self._effective[name]
            return effective_tensor(module, attribute)
        return self._params[name].detach()

    def _exclude(self, owner: _Owner, reason: str, kind: str | None = None) -> None:
        """Leave ``owner``'s parameters out of this step, warning once per module and ``kind``
        of reason (default: the reason itself; a reason that quotes shapes passes a kind so
        that a changing sequence length does not warn on every step)."""
        owner.skip_reason = reason
        for call in owner.calls:
            _release(call, consumed=False)
        owner.calls = []
        key = f"{owner.module_name}:{type(owner.module).__name__}:{kind or reason}"
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"lightning_gradwatch: {type(owner.module).__name__} '{owner.module_name}' is "
                f"left out of per-sample statistics: {reason}.",
                stacklevel=2,
            )

    def _finalize(self) -> None:
        try:
            if self._incomplete:
                self._stats = None
                if "incomplete" not in self._warned:
                    self._warned.add("incomplete")
                    warnings.warn(
                        "lightning_gradwatch: a backward pass went through a graph whose "
                        "captures an earlier backward already used (retain_graph=True); it "
                        "has no per-sample statistics. Run the forward again for each "
                        "backward you want probed.",
                        stacklevel=2,
                    )
                return
            for owner in self._owners:
                if owner.calls:
                    self._compute(owner)
            self._stats = self._assemble()
        finally:
            self._clear_captures()
        if self._stats._statistic_tensors():
            nonfinite = (~self._stats.finite).to(torch.int64)
            pending = self._skipped_pending
            self._skipped_pending = nonfinite if pending is None else pending + nonfinite
        for listener in self._listeners:
            listener(self._stats)

    def _assemble(self) -> ProbeStats:
        contributions: dict[str, list[ParamStats]] = {}
        excluded: dict[str, str] = {}
        # The batch is the declared one, else the model's: dim 0 of the first tensor its latest
        # forward received. A module that saw another number of rows (a subset of the batch,
        # flattened positions, a sequence-first layout) has no per-sample statistics to
        # report. Without either (submodules called directly), the first module's batch is
        # the reference.
        batch = self._batch_size if self._batch_size is not None else self._model_batch
        for owner in self._owners:
            if owner.result and batch is None:
                batch = next(iter(owner.result.values())).dot.shape[0]
            if owner.result and batch is not None:
                rows = next(iter(owner.result.values())).dot.shape[0]
                if rows != batch:
                    owner.result = None
                    self._exclude(
                        owner,
                        f"its statistics have {rows} samples but the batch has {batch} (its "
                        f"input shape {owner.seen_shape}, sample dim {owner.batch_dim}): it "
                        f"saw a subset of the batch, flattened positions, or samples along "
                        f"another dim; declare that dim with GradientProbe(batch_dims=...), "
                        f"or the batch with batch_size=... if dim 0 of the model's input is "
                        f"not the batch",
                        kind="batch size",
                    )
            if owner.skip_reason is not None:
                for name in owner.local_to_name.values():
                    excluded[name] = owner.skip_reason
            for name, s in (owner.result or {}).items():
                contributions.setdefault(name, []).append(s)
        if batch is None:
            batch = 0
        stats = ProbeStats(batch_size=batch, excluded=excluded)
        for name in self.param_names:
            if name in excluded:
                continue
            param = self._tensor(name)
            found = contributions.get(name)
            if not found:
                if name in self._unowned or batch == 0:
                    continue
                # Tracked but unused in this forward: every per-sample gradient is zero.
                dtype = torch.promote_types(param.dtype, torch.float32)
                zeros = torch.zeros(batch, dtype=dtype, device=param.device)
                nothing = torch.zeros_like(param, dtype=dtype)
                found = [ParamStats(zeros, zeros, nothing, grad_sum=nothing)]
            if len(found) == 1:
                s = found[0]
            else:
                grad_sample = torch.stack([f.grad_sample for f in found]).sum(0)
                flat = grad_sample.flatten(1)
                s = ParamStats(
                    dot=flat @ param.reshape(-1).to(flat.dtype),
                    sq_norm=flat.pow(2).sum(1),
                    sum_sq=grad_sample.pow(2).sum(0) if self.sum_grad_squared else None,
                    grad_sum=grad_sample.sum(0) if self.sum_grad_squared else None,
                )
            if s.dot.shape[0] != batch:
                excluded[name] = f"batch size {s.dot.shape[0]} differs from {batch}"
                continue
            stats.dot[name] = s.dot
            stats.sq_norm[name] = s.sq_norm
            flat = param.reshape(-1).to(s.dot.dtype)
            stats.param_sq_norm[name] = flat @ flat
            if self.sum_grad_squared and s.sum_sq is not None:
                stats.sum_sq[name] = s.sum_sq
                if s.grad_sum is not None:
                    # From the same per-sample values as sum_sq: see ParamStats.grad_sum.
                    stats.grad_sum[name] = s.grad_sum
                elif name in self._grad_sum:
                    grad = self._grad_sum[name]
                    stats.grad_sum[name] = grad.to(s.sum_sq.dtype) * self._grad_factor(batch)
                else:
                    stats.grad_sum[name] = torch.zeros_like(s.sum_sq)
        for name in self._unowned:
            excluded.setdefault(name, "no module owns it as a direct parameter")
        return stats

    def _clear_captures(self) -> None:
        for owner in self._owners:
            for call in owner.calls:  # their grad hooks may outlive this backward
                _release(call, consumed=True)
            owner.calls = []
            owner.missing_grads = 0
            owner.result = None
            owner.skip_reason = None
        self._grad_sum = {}
        self._view_outputs = {}
        self._incomplete = False
        self._model_batch = None
        self._finalize_queued = False


_SEQUENCE_FIRST_CONTAINERS = (
    nn.Transformer,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
)


_STACKS = (nn.TransformerEncoder, nn.TransformerDecoder)


def _builtin_batch_dims(model: nn.Module) -> dict[int, int]:
    """``id(module) -> 1`` for every module inside a built-in transformer container that runs
    sequence-first (``batch_first=False``): its Linear, LayerNorm and attention submodules see
    ``(T, B, E)``. Layers carry the flag on ``self_attn``; ``nn.TransformerEncoder``/``Decoder``
    follow their first layer."""
    dims: dict[int, int] = {}
    for module in model.modules():
        if not isinstance(module, _SEQUENCE_FIRST_CONTAINERS):
            continue
        # Layers keep the flag on their attention module; stacks follow their first layer.
        layer = module.layers[0] if isinstance(module, _STACKS) and len(module.layers) else module
        attention = getattr(layer, "self_attn", None)
        flag = getattr(module, "batch_first", getattr(attention, "batch_first", None))
        if flag is False:
            dims.update((id(m), 1) for m in module.modules())
    return dims


def _samples_first(call: Call, batch_dim: int) -> Call:
    """The call of a position-wise layer with the sample dim of its first argument, its
    outputs and their gradients moved to dim 0 (the layer acts on each position alike)."""

    def move(x: Any) -> Any:
        return x.movedim(batch_dim, 0) if isinstance(x, Tensor) and x.dim() > batch_dim else x

    return Call(
        args=(move(call.args[0]), *call.args[1:]) if call.args else call.args,
        kwargs=call.kwargs,
        outputs=[move(o) for o in call.outputs],
        output_versions=call.output_versions,
        grads=[move(g) for g in call.grads],
    )


def _perturb_sample_zero(x: Any, batch: int) -> Any:
    """``x`` with sample 0 (index 0 of dim 0) changed, if ``x`` is a batched tensor."""
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != batch:
        return x
    x = x.detach().clone()
    if x.is_floating_point() or x.is_complex():
        x[0] += 1
    else:  # token ids, class indices: stay in range by copying another sample
        x[0] = x[1]
    return x


def _confined_dims(before: Tensor, after: Tensor, batch: int) -> set[int]:
    """Dims of size ``batch`` along which every difference between ``before`` and ``after``
    lies at index 0; empty when nothing changed."""
    changed = before != after
    if not bool(changed.any()):  # once per probe, on the verification forward
        return set()
    return {
        d
        for d in range(changed.dim())
        if changed.shape[d] == batch and not bool(changed.narrow(d, 1, batch - 1).any())
    }


def _drop_reregistered(owners: list[_Owner]) -> list[_Owner]:
    """Give a Parameter that a module registers again under a second name (Opacus'
    ``RenameParamsMixin``, ``self.w = self.child.weight``) to the descendant that owns it too.

    The descendant is the module whose forward uses it; the ancestor's registration is an alias,
    and counting both would add the ancestor's replay to the descendant's rule (double the
    gradient). Two modules where neither contains the other (genuine tying) both keep it.
    """
    descendants = {
        id(o.module): {id(m) for m in o.module.modules()} - {id(o.module)} for o in owners
    }
    kept: list[_Owner] = []
    for owner in owners:
        inner = descendants[id(owner.module)]
        aliases = {
            local
            for local, name in owner.local_to_name.items()
            if any(
                id(other.module) in inner and name in other.local_to_name.values()
                for other in owners
            )
        }
        if aliases:
            owner.local_to_name = {k: v for k, v in owner.local_to_name.items() if k not in aliases}
        if owner.local_to_name:
            kept.append(owner)
    return kept


def _release(call: Call, consumed: bool) -> None:
    """Drop a call's captured tensors. Its grad hooks stay registered on the graph for as long
    as the caller keeps any tensor of that graph (e.g. the loss), and they reference the call,
    so the tensors must be dropped explicitly to be freed after the backward."""
    call.args, call.kwargs, call.outputs, call.state = (), {}, [], None
    call.grads = [None] * len(call.grads)
    call.consumed = consumed


def _reshaped_base(output: Tensor, exposed: set[int]) -> Tensor | None:
    """The base of a view output that is a plain reshape of it, to back up the output's hook.

    A hook registered on a view is silently dropped when the view is later modified in place
    (autograd rebases the view onto a new node), e.g. ``nn.ReLU(inplace=True)`` after a
    Linear on ``(B, T, K)`` inputs, whose output is a reshaped view of a 2-D matmul result. A
    hook on the base survives and receives the gradient of the base's original value, which
    is the output's gradient reshaped when the output is a plain reshape of a base internal
    to the module (neither an input nor an output of the call). ``None`` otherwise.
    """
    base = output._base
    if (
        base is None
        or base.grad_fn is None
        or id(base) in exposed
        or base.numel() != output.numel()
        or base.storage_offset() != output.storage_offset()
        or not base.is_contiguous()
        or not output.is_contiguous()
    ):
        return None
    return base


def _is_leaf(x: Any) -> bool:
    """Not a container that pytree would descend into."""
    return not isinstance(x, (tuple, list, dict))


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
        self.parametrizations = {
            id(m)
            for plist in probe.model.modules()
            if isinstance(plist, parametrize.ParametrizationList)
            for m in plist.modules()
        }
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
        # Evaluating a parametrization (reading `fc.weight`) pushes its own modules: the use
        # belongs to whichever module read the weight, below them on the stack.
        stack = [m for m in self.stack if id(m) not in self.parametrizations]
        on_stack = {id(m) for m in stack}
        for name in used:
            if self.owners_of.get(name, set()) & on_stack:
                continue
            if not stack:
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
            user = self.names.get(id(stack[-1]), type(stack[-1]).__name__)
            raise ParameterUseError(
                f"parameter '{name}' is used directly inside the forward of module "
                f"'{user}' ({type(stack[-1]).__name__}), which does not own it, so its "
                f"per-sample gradient cannot be attributed exactly. Either leave it out "
                f"(GradientProbe(params=[...]) without '{name}'), or call the owning module "
                f"instead of using its weight, or share the Parameter object itself "
                f"(module_b.weight = module_a.weight), which the probe handles exactly."
            )
        return result
