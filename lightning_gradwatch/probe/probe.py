"""``GradientProbe``: per-sample gradient statistics from forward and backward hooks.

The engine is split by concept: ownership (``owners.py``), capture hooks (``capture.py``),
sample-dim detection (``sample_dims.py``), computing and assembling a backward's statistics
(``finalize.py``) and the one-time parameter-use check (``use_checker.py``). This file holds
the class, its configuration and its public API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import rules as _rules  # noqa: F401  (registers the layer rules)
from .capture import _Capture
from .finalize import LossReduction, _Finalize
from .owners import _Owner, resolve_owners
from .rules.parametrized import reparametrized_tensors
from .sample_dims import _builtin_batch_dims, _SampleDims
from .stats import NonfiniteCount, ProbeStats
from .use_checker import ParameterUseError, _UseChecker

__all__ = ["GradientProbe", "LossReduction", "ParameterUseError"]


class GradientProbe(_Capture, _SampleDims, _Finalize):
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
            every forward (``"always"``), or never. With ``"first"`` the check leaves after
            the first probed backward, so later forwards pay nothing for it.
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
        self._reached_nodes: list[Any] = []  # see _Capture's gradient hook
        self._root_node: Any = None  # see set_loss
        self._backward_task = -1  # the graph task of the backward being probed
        self._model_batch: int | None = None  # dim 0 of the model's input, this step
        self._verified = False
        self._dims_checked = False
        self._grad_scale: float | Tensor = 1.0
        self._grad_sum: dict[str, Tensor] = {}
        # What the use checker saw (see _Finalize._autograd_sum_exact): whether it watched a
        # whole forward, and the tracked parameters it saw used outside every module.
        self._uses_known = False
        self._outside_uses: set[str] = set()
        self._autocast_seen = False  # a probed module ran under autocast in this step
        # id(call) -> indices of outputs that are views hooked directly (see _hook_target).
        self._view_outputs: dict[int, set[int]] = {}
        self._warned: set[str] = set()
        self._stats: ProbeStats | None = None
        self._listeners: list[Callable[[ProbeStats], None]] = []
        # Backward passes with non-finite statistics: counted on the statistics' device, so
        # that no step waits for the device; read (once) by ``skipped_backwards``.
        self._nonfinite = NonfiniteCount()

    # ------------------------------------------------------------------ ownership

    # ------------------------------------------------------------------ ownership
    def _resolve_owners(self) -> list[_Owner]:
        return resolve_owners(self.model, self._params, self._effective)

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

    def excluded_params(self) -> dict[str, str]:
        """Tracked parameters the probe leaves out, known before any backward pass: name (in
        the model) to the reason (e.g. BatchNorm in training mode). Exclusions found during
        a backward pass are in :attr:`ProbeStats.excluded` of that pass."""
        return {
            name: owner.skip_reason
            for owner in self._owners
            if owner.skip_reason is not None
            for name in owner.local_to_name.values()
        }

    @property
    def skipped_backwards(self) -> int:
        """Probed backward passes whose statistics were not finite (NaN or Inf). Counted on
        the device; reading it synchronises once."""
        return self._nonfinite.value

    @skipped_backwards.setter
    def skipped_backwards(self, value: int) -> None:
        self._nonfinite.value = value

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

    def set_loss(self, loss: Tensor | None) -> None:
        """Name the tensor whose backward pass comes next (``None``: forget it).

        Optional. A backward given ``inputs=`` (or ``torch.autograd.grad``) skips the layers
        that lead to none of the tensors it was asked for; they get no output gradient, like
        a layer off the loss, but their gradients are not zero, so the probe refuses them
        (``stats.excluded``). It sees the skip below any layer the backward reached; with the
        loss it also sees it in a branch beside them (two heads, asked for one). Held until
        the end of the next probed backward, :meth:`reset` or :meth:`detach`. The callbacks
        set it from ``on_before_backward``.

        Args:
            loss: the ``()`` (or any) tensor ``backward`` will be called on.
        """
        self._root_node = None if loss is None else loss.grad_fn

    def reset(self) -> None:
        """Forget the last statistics (and the loss given to :meth:`set_loss`)."""
        self._stats = None
        self._root_node = None

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
