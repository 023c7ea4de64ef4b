"""Capture hooks: what each probed module saw in the forward pass, and the gradients of its
outputs in the backward pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .call_edges import current_node, graph_task_id
from .input_grad import release as release_route
from .input_grad import watch
from .owners import _Owner
from .registry import Call


class _Capture:
    """The forward, gradient and parameter hooks of
    :class:`~lightning_gradwatch.probe.GradientProbe`."""

    _replaying: bool
    _model_batch: int | None
    _checker: Any
    _dims_hook: Any
    _view_outputs: dict[int, set[int]]
    _incomplete: bool
    _reached_nodes: list[Any]
    _backward_task: int
    _grad_sum: dict[str, Tensor]
    _autocast_seen: bool
    sum_grad_squared: bool

    # Defined by GradientProbe and _Finalize (annotations only: no attribute is created).
    _retire_checks: Callable[[], None]
    _exclude: Callable[..., None]
    _start_backward: Callable[[], None]
    _compute: Callable[[_Owner], None]
    _compute_early: Callable[[_Owner], None]

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
            if self.sum_grad_squared and _autocast_on(outputs[live[0]].device.type):
                # Autograd's weight gradients are then rounded to 16 bits: not the exact sum.
                self._autocast_seen = True
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
            exposed: set[int] | None = None  # formed only for a view output (rare)
            for k in live:
                out = outputs[k]
                out.register_hook(self._make_grad_hook(owner, call, k))
                if not out._is_view():
                    continue
                if exposed is None:
                    exposed = (
                        {id(t) for t in (*args, output)}
                        if flat
                        else {id(t) for t in tree_flatten((args, kwargs, output))[0]}
                    )
                base = _reshaped_base(out, exposed)
                if base is None:  # cannot be backed up: detect a lost hook at backward
                    self._view_outputs.setdefault(id(call), set()).add(k)
                else:
                    base.register_hook(self._make_grad_hook(owner, call, k, backup_shape=out.shape))
            if flat and len(outputs) == 1 and id(call) not in self._view_outputs:
                # Where the rule can read <G_i, W> from the gradient autograd forms at the
                # input, the output need not be held until its gradient arrives (autograd does
                # not keep a linear layer's output). A view output whose hook can be lost is
                # kept: the check for a lost hook reads its version.
                route = owner.rule.input_grad_route(module, args, output)
                if route is not None:
                    call.input_grad = route
                    call.outputs = [None]
                elif not owner.rule.output_needed(module, args):
                    call.outputs = [None]

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
                if call.early_in_task is not None and call.early_in_task == graph_task_id():
                    return  # used early in this backward (see _Finalize._compute_early)
                # A second backward through a graph kept with retain_graph=True reaches calls
                # that an earlier backward consumed: this backward cannot be probed.
                self._incomplete |= call.consumed
                return
            call.grads[k] = grad
            # The node this gradient enters: where the end of the backward starts looking for
            # parts of the graph the backward left out (see _Finalize._refuse_unreached). Not
            # from a reentrant backward inside it (checkpoint): its nodes are in another graph.
            if graph_task_id() == self._backward_task:
                self._reached_nodes.append(current_node())
            if call.input_grad is not None:
                watch(call.input_grad)  # before the call's product node runs
            owner.missing_grads -= 1
            if owner.missing_grads == 0:
                # Every output of every call has its gradient: compute now and free early.
                self._compute(owner)
            elif owner.rule.computes_early:
                self._compute_early(owner)

        return hook

    def _on_empty_output(self, grad: Tensor) -> None:
        self._start_backward()

    def _make_param_hook(self, name: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            self._start_backward()
            # Only a backward whose forward the use checker watched may use autograd's
            # gradient as grad_sum (see _Finalize._autograd_sum_exact); others skip the copy.
            # The owning call's own part, read from its autograd edge, arrived already where
            # it could be (it runs before this node): it excludes uses outside the modules.
            if not self._uses_known or self._autocast_seen or name in self._grad_sum:
                return
            # A copy, made now: holding autograd's tensor past this hook would make autograd
            # copy it when accumulating into `.grad` (it takes the tensor itself otherwise),
            # and `.grad` may later be modified in place (accumulation, zero_grad).
            self._grad_sum[name] = grad.clone()

        return hook


def _release(call: Call, consumed: bool) -> None:
    """Drop a call's captured tensors. Its grad hooks stay registered on the graph for as long
    as the caller keeps any tensor of that graph (e.g. the loss), and they reference the call,
    so the tensors must be dropped explicitly to be freed after the backward."""
    call.args, call.kwargs, call.outputs, call.state = (), {}, [], None
    call.grads = [None] * len(call.grads)
    call.consumed = consumed
    route, call.input_grad = call.input_grad, None
    if route is not None and not route.on_arrival:  # no rule result waits for it
        release_route(route)


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


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is enabled for ``device_type``; ``True`` for a device type autocast
    does not know (e.g. ``meta``), so that nothing is assumed about its precision."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return True


def _is_leaf(x: Any) -> bool:
    """Not a container that pytree would descend into."""
    return not isinstance(x, (tuple, list, dict))


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x
