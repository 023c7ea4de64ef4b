"""Computing and assembling one backward pass's statistics: each owner's rule runs as soon as
its outputs' gradients have all arrived, and the results are rescaled to unscaled
per-sample losses and assembled into :class:`ProbeStats` at the end of the backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.fabric.utilities import rank_zero_warn
from torch import Tensor, nn

from ._linalg import sq_norm
from .call_edges import (
    accumulator,
    call_edges,
    current_node,
    graph_task_id,
    leaves_out_nodes,
    sum_hook,
    will_run,
)
from .capture import _release
from .owners import _Owner
from .registry import Call, ParamStats, RuleContext, SkipModule
from .rules.fallback import FallbackRule
from .rules.parametrized import effective_tensor
from .sample_dims import _samples_first
from .stats import NonfiniteCount, ProbeStats

LossReduction = Literal["mean", "sum"]


class _Finalize:
    """The per-backward computation of :class:`~lightning_gradwatch.probe.GradientProbe`."""

    loss_reduction: LossReduction
    loss_scale: float | Tensor | Callable[[], float | Tensor]
    sum_grad_squared: bool
    chunk_elements: int
    param_names: list[str]
    _params: dict[str, nn.Parameter]
    _effective: dict[str, tuple[nn.Module, str]]
    _owners: list[_Owner]
    _shared: set[str]
    _unowned: list[str]
    _batch_size: int | None
    _model_batch: int | None
    _replaying: bool
    _finalize_queued: bool
    _incomplete: bool
    _reached_nodes: list[Any]
    _root_node: Any
    _backward_task: int
    _verified: bool
    _grad_scale: float | Tensor
    _grad_sum: dict[str, Tensor]
    _uses_known: bool
    _outside_uses: set[str]
    _autocast_seen: bool
    _checker: Any
    _view_outputs: dict[int, set[int]]
    _warned: set[str]
    _stats: ProbeStats | None
    _listeners: list[Callable[[ProbeStats], None]]
    _nonfinite: NonfiniteCount

    def _start_backward(self) -> None:
        if self._finalize_queued:
            return
        self._finalize_queued = True
        self._backward_task = graph_task_id()  # the graph task at whose end _finalize runs
        self._verified = True
        # The previous backward's statistics are superseded: dropping them now (rather than
        # when the new ones are assembled) keeps their parameter-sized sums (sum_grad_squared)
        # from adding to this backward's peak memory, unless a caller still holds them.
        self._stats = None
        # Known only when the checker watched this backward's own forward.
        self._uses_known = self._checker is not None
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
        for call in owner.calls if self._view_outputs else ():
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

    def _compute_early(self, owner: _Owner) -> None:
        """Let ``owner``'s rule compute from the output gradients that have arrived (see
        :meth:`LayerRule.compute_early`); where it does, its one call is released now, and a
        gradient arriving later in this backward for another of its outputs is ignored."""
        if len(owner.calls) != 1:
            return
        call = owner.calls[0]
        if not self._compute_calls(owner, [call], early=True):
            return  # declined: wait for the rest, or the end of the backward
        owner.calls = []
        call.early_in_task = graph_task_id()
        _release(call, consumed=True)

    def _compute_calls(self, owner: _Owner, captured: list[Call], early: bool = False) -> bool:
        """Run ``owner``'s rule on ``captured`` (or leave the owner out, saying why); with
        ``early``, its :meth:`LayerRule.compute_early`. ``False`` only where that declined."""
        first = captured[0].args[0] if len(captured) == 1 and captured[0].args else None
        if isinstance(first, Tensor) and len(captured[0].grads) == 1:
            # One call with one output and a tensor input (most layers): the same as below,
            # without the generic scans.
            calls, sample = captured, captured[0].grads[0]
            if sample is None or owner.skip_reason is not None:
                return True
            owner.seen_shape = tuple(first.shape)
        else:
            calls = [c for c in captured if any(g is not None for g in c.grads)]
            if not calls or owner.skip_reason is not None:
                return True
            sample = next(g for c in calls for g in c.grads if g is not None)
            owner.seen_shape = next(
                (tuple(a.shape) for c in calls for a in c.args if isinstance(a, Tensor)), None
            )
        if sample.dtype.is_complex:
            # The rules' algebra (inner products, squared norms) is that of real tensors.
            self._exclude(
                owner,
                f"its output gradients are complex ({sample.dtype}), and per-sample "
                f"statistics are defined here for real-valued layers only; leave it out "
                f"with params=[...]",
            )
            return True
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
                return True
        need_grad_sum = not (self.sum_grad_squared and self._autograd_sum_exact(owner, calls))
        key = (sample.dtype, batch_dim, need_grad_sum, self.sum_grad_squared, self.chunk_elements)
        ctx = owner.contexts.get(key)
        if ctx is None:  # the same on most steps: built once (a frozen dataclass costs)
            ctx = owner.contexts[key] = RuleContext(
                dtype=torch.promote_types(sample.dtype, torch.float32),
                want=owner.want,
                need_sum_sq=self.sum_grad_squared,
                need_grad_sample=owner.need_grad_sample,
                chunk_elements=self.chunk_elements,
                batch_dim=batch_dim,
                need_grad_sum=need_grad_sum,
            )
        self._replaying = True
        try:
            if early:
                early_result = owner.rule.compute_early(owner.module, calls, ctx)
                if early_result is None:
                    return False
                result = early_result
            else:
                result = owner.rule.compute(owner.module, calls, ctx)
        except SkipModule as skip:  # a deliberate refusal; any other error is a bug: propagate
            self._exclude(owner, skip.reason)
            return True
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
            return True
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
            return True
        # Still in autograd's scale: _assemble rescales every parameter's statistics at once.
        owner.result = {owner.local_to_name[local]: s for local, s in result.items()}
        return True

    def _autograd_sum_exact(self, owner: _Owner, calls: list[Call]) -> bool:
        """Whether autograd's own gradient of each of ``owner``'s parameters from this backward
        stands in exactly for the sum of the per-sample gradients the rule forms, so the rule
        need not form ``sum_i g_i`` again. Called while the owner's last output gradient is
        being delivered; where it answers ``True``, ``self._grad_sum`` receives that gradient
        before the end of the backward.

        That needs parameters and backprops in float32/float64 and no autocast (a 16-bit
        weight gradient is rounded: see ``ParamStats.grad_sum``), and then one of:

        - the module's own part of the gradient, taken from the autograd edges of this very
          call (:meth:`_capture_call_edges`): exact whatever else uses the parameter, on
          every step, for the layers whose backward graph has a known shape;
        - autograd's whole gradient of the parameter, on a backward whose forward the use
          checker watched and saw no use outside the owning modules (a weight penalty is in
          autograd's gradient but in no sample's), and which accumulates that gradient.

        Otherwise the rule forms the sum.
        """
        if self._autocast_seen:
            return False
        for call in calls:
            for g in call.grads:
                if g is not None and (not g.is_floating_point() or g.dtype.itemsize < 4):
                    return False
        for name in owner.local_to_name.values():
            param = self._params.get(name)
            if param is None or not param.is_floating_point() or param.dtype.itemsize < 4:
                return False
        if self._capture_call_edges(owner, calls):
            return True
        if not self._uses_known:
            return False
        for name in owner.local_to_name.values():
            if name in self._outside_uses:
                return False
            # Autograd's whole gradient reaches the parameter's hook only where this backward
            # accumulates it: not in a backward(inputs=...) that leaves the parameter out,
            # nor (unasked) in torch.autograd.grad. Without it the sum would read as zero.
            if not will_run(accumulator(self._params[name])):
                return False
        return True

    def _unscale(self, stats: ProbeStats, batch: int) -> None:
        """Rescale the rules' results in ``stats`` from autograd's backprops to unscaled
        per-sample losses: ``dot`` and ``grad_sum`` by the factor, squares by its square, in
        one fused call (a Python float factor) rather than one kernel per parameter."""
        factor = self._grad_factor(batch)
        if isinstance(factor, float) and factor == 1.0:
            return
        linear = [*stats.dot.values(), *stats.grad_sum.values()]
        squares = [*stats.sq_norm.values(), *stats.sum_sq.values()]
        if not linear:
            return
        if isinstance(factor, float) and (len(linear) > 1 or linear[0].device.type != "cpu"):
            # One fused call with a factor per tensor: each tensor is multiplied exactly as by
            # its own `mul_`. (On the CPU, where a fused call is a loop of `mul_` with more
            # overhead, a single parameter's two tensors take the loop below.)
            torch._foreach_mul_(
                [*linear, *squares], [factor] * len(linear) + [factor * factor] * len(squares)
            )
            return
        # One kernel each (a () tensor factor stays on the loss scale's device).
        squared = factor * factor
        for t in linear:
            t.mul_(factor)
        for t in squares:
            t.mul_(squared)

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
            rank_zero_warn(
                f"lightning_gradwatch: {type(owner.module).__name__} '{owner.module_name}' is "
                f"left out of per-sample statistics: {reason}."
            )

    def _finalize(self) -> None:
        try:
            if self._incomplete:
                self._stats = None
                if "incomplete" not in self._warned:
                    self._warned.add("incomplete")
                    rank_zero_warn(
                        "lightning_gradwatch: a backward pass went through a graph whose "
                        "captures an earlier backward already used (retain_graph=True); it "
                        "has no per-sample statistics. Run the forward again for each "
                        "backward you want probed."
                    )
                return
            self._refuse_unreached()
            for owner in self._owners:
                if owner.calls:
                    self._compute(owner)
            self._stats = self._assemble()
        finally:
            self._clear_captures()
        # Counted on the device, together with later passes (no kernel per step).
        self._nonfinite.add(self._stats)
        for listener in self._listeners:
            listener(self._stats)

    def _refuse_unreached(self) -> None:
        """Leave out of this backward the owners some of whose outputs got no gradient, where
        the backward pruned the graph.

        An output whose gradient never arrives does not reach the loss in a plain backward,
        and its per-sample gradients are zero. A backward given ``inputs=`` (or
        ``torch.autograd.grad``) also skips the layers below the tensors it was asked for,
        whose gradients are not zero: autograd just did not form them. Torch cannot say which
        of the two a skipped output is, so where the backward is seen pruning the graph, every
        owner with a missing gradient is refused rather than reported as zero. The graph is
        searched below the nodes where output gradients arrived, and below the loss where
        :meth:`GradientProbe.set_loss` named it.
        """
        stalled = [o for o in self._owners if o.missing_grads > 0 and o.calls]
        if not stalled:
            return
        reached = self._reached_nodes
        if self._root_node is not None:
            reached = [self._root_node, *reached]
        if not leaves_out_nodes(reached):
            return
        for owner in stalled:
            self._exclude(
                owner,
                "this backward pass did not form the gradient of its output: it was given "
                "inputs= (or was a torch.autograd.grad) that leave this layer out, so its "
                "per-sample gradients are unknown here (not zero). Include its parameters in "
                "the backward's inputs, or track only the layers such a backward reaches "
                "with params=[...]",
                kind="unreached",
            )

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
            missing_sum = s.sum_sq is not None and s.grad_sum is None
            if self.sum_grad_squared and missing_sum and name not in self._grad_sum:
                # _autograd_sum_exact said autograd's gradient would stand in for the sum, and
                # it never came: the sum is unknown, not zero.
                excluded[name] = (
                    "autograd's gradient of it, taken as the sum of its per-sample gradients, "
                    "did not reach the probe in this backward"
                )
                continue
            stats.dot[name] = s.dot
            stats.sq_norm[name] = s.sq_norm
            flat = param.reshape(-1)
            if flat.dtype != s.dot.dtype:
                flat = flat.to(s.dot.dtype)
            stats.param_sq_norm[name] = sq_norm(flat)
            if self.sum_grad_squared and s.sum_sq is not None:
                stats.sum_sq[name] = s.sum_sq
                if s.grad_sum is not None:
                    # From the same per-sample values as sum_sq: see ParamStats.grad_sum.
                    stats.grad_sum[name] = s.grad_sum
                else:
                    # Autograd's own gradient of this backward (see _autograd_sum_exact), a
                    # copy the probe owns; _unscale rescales it with the rules' sums.
                    stats.grad_sum[name] = self._grad_sum[name].to(s.sum_sq.dtype)
        for name in self._unowned:
            excluded.setdefault(name, "no module owns it as a direct parameter")
        self._unscale(stats, batch)
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
        self._autocast_seen = False
        self._view_outputs = {}
        self._incomplete = False
        self._reached_nodes = []
        self._root_node = None
        self._model_batch = None
        self._finalize_queued = False

    def _capture_call_edges(self, owner: _Owner, calls: list[Call]) -> bool:
        """Arrange for autograd's own part of ``owner``'s gradient from its one call in this
        backward to land in ``self._grad_sum`` (see ``call_edges.py``), and say whether it
        will: every tracked parameter of the owner must be reached from the call's backward
        node by an edge the running backward executes. Called from the hook delivering the
        call's output gradient, so the node being run is the call's output's ``grad_fn``.
        """
        if len(calls) != 1 or len(calls[0].grads) != 1 or not calls[0].args:
            return False
        layer_input = calls[0].args[0]
        if not isinstance(layer_input, Tensor):
            return False
        edges = call_edges(current_node(), layer_input)
        if edges is None:
            return False
        plan = []
        for name in owner.local_to_name.values():
            param = self._params.get(name)
            if param is None or name in self._shared or id(param) not in edges:
                return False
            hook_node, slot, accumulate = edges[id(param)]
            if not will_run(accumulate):
                return False
            plan.append((name, hook_node, slot, param))
        for name, hook_node, slot, param in plan:
            hook_node.register_hook(sum_hook(self._grad_sum, name, slot, param))
        return True
