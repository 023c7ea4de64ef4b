"""Where one module call's gradient reaches its parameters in the autograd graph.

A linear or convolution layer's backward is one node (``AddmmBackward0``, ``MmBackward0``,
``ConvolutionBackward0``, possibly under a reshape), and the part of a parameter's gradient
that comes from this call flows along one edge from that node (or from the ``TBackward0`` of
the transposed weight) into the parameter's ``AccumulateGrad`` node. That part is exactly the
sum over samples of the per-sample gradients a rule forms for the call, whatever else uses the
parameter (a weight penalty adds its own edge, which is not read). Reading it costs nothing:
autograd computes it for the weight gradient anyway.

Any other graph shape (a parametrization, a cast under autocast, several calls, padding modes
that copy the input, an unknown node) gives ``None``: the rule then forms the sum itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: Reshapes that F.linear puts over its product for inputs with more than two dims.
_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0"})
#: Backward node name to (the attribute holding the saved layer input, the slot of that
#: input among the node's edges, the slots of the parameters' edges).
_LAYER_NODES: dict[str, tuple[str, int, tuple[int, ...]]] = {
    "AddmmBackward0": ("_saved_mat1", 1, (0, 2)),  # addmm(bias, input, weight.t())
    "MmBackward0": ("_saved_self", 0, (1,)),  # mm(input, weight.t())
    "ConvolutionBackward0": ("_saved_input", 0, (1, 2)),  # convolution(input, weight, bias)
}

#: Per parameter: (the node to hook, the slot of its gradient outputs that carries the
#: parameter's part, the parameter's ``AccumulateGrad`` node).
Edges = dict[int, tuple[Any, int, Any]]


def current_node() -> Any:
    """The autograd node whose backward is being run (or whose gradient hooks are being
    called) on this thread; ``None`` outside a backward or where torch does not say."""
    get = getattr(torch._C, "_current_autograd_node", None)
    return get() if get is not None else None


def graph_task_id() -> int:
    """The id of the backward pass (autograd graph task) running on this thread: a
    reentrant backward inside it (``checkpoint(use_reentrant=True)``) has its own; -1
    outside a backward or where torch does not say."""
    get = getattr(torch._C, "_current_graph_task_id", None)
    return get() if get is not None else -1


def product_under(node: Any, layer_input: Tensor) -> tuple[Any, str, int, tuple[int, ...]] | None:
    """The linear or convolution product of one call, found from the ``grad_fn`` of its output.

    Returns ``(product node, its name, input slot, parameter slots)`` when ``node`` is, or is
    one reshape over, a product node of a known layout that saved ``layer_input`` itself (same
    storage, size, last dim and dtype); ``None`` otherwise (another graph, or a saved tensor
    freed by an earlier backward).

    Args:
        node: the backward node that produced the call's output.
        layer_input: the input the call received (detached), ``(B, ..., in)``.
    """
    if node is None:
        return None
    if node.name() in _RESHAPES:
        following = node.next_functions
        if len(following) != 1 or following[0][0] is None:
            return None
        node = following[0][0]
    name = node.name()
    layout = _LAYER_NODES.get(name)
    if layout is None:
        return None
    saved_name, input_slot, param_slots = layout
    if len(node.next_functions) <= max(input_slot, *param_slots):
        return None
    try:
        saved = getattr(node, saved_name)
    except RuntimeError:  # freed by an earlier backward
        return None
    if (
        not isinstance(saved, Tensor)
        or saved.data_ptr() != layer_input.data_ptr()
        or saved.numel() != layer_input.numel()
        or saved.shape[-1] != layer_input.shape[-1]
        or saved.dtype != layer_input.dtype
    ):
        return None
    return node, name, input_slot, param_slots


def call_edges(node: Any, layer_input: Tensor) -> Edges | None:
    """The edges from one linear or convolution call's backward ``node`` (the ``grad_fn`` of
    its output) into the ``AccumulateGrad`` nodes of its parameters, by ``id`` of the
    parameter; ``None`` unless the graph has exactly the shape of such a call on
    ``layer_input`` (the node saved a tensor with its storage and size).

    Args:
        node: the backward node that produced the call's output.
        layer_input: the input the call received (detached), ``(B, ..., in)``.
    """
    found = product_under(node, layer_input)
    if found is None:
        return None  # not the product of this call's own input: refuse
    node, _, _, param_slots = found
    following = node.next_functions
    edges: Edges = {}
    for slot in param_slots:
        target = following[slot][0]
        if target is None:  # no bias, or a parameter that does not require grad
            continue
        hook_node, hook_slot = node, slot
        if target.name() == "TBackward0":  # the weight enters a linear layer transposed
            inner = target.next_functions
            if len(inner) != 1 or inner[0][0] is None:
                return None
            hook_node, hook_slot, target = target, 0, inner[0][0]
        param = getattr(target, "variable", None)
        if type(target).__name__ != "AccumulateGrad" or not isinstance(param, Tensor):
            return None  # a parameter computed in the forward (parametrization, cast)
        if id(param) in edges:
            return None
        edges[id(param)] = (hook_node, hook_slot, target)
    return edges


def will_run(accumulate: Any) -> bool:
    """Whether the running backward executes a parameter's ``AccumulateGrad`` node, so that
    the edge into it carries a computed gradient: not in a ``backward(inputs=...)`` that
    leaves the parameter out, nor in ``torch.autograd.grad`` (which accumulates nothing and
    cannot be asked)."""
    check = getattr(torch._C, "_will_engine_execute_node", None)
    if check is None or accumulate is None:
        return False
    try:
        return bool(check(accumulate))
    except RuntimeError:  # asked under torch.autograd.grad
        return False


def accumulator(param: Tensor) -> Any:
    """The node that accumulates ``param``'s gradient (``AccumulateGrad`` for a leaf), to ask
    :func:`will_run` about; ``None`` where torch does not say."""
    get = getattr(torch.autograd.graph, "get_gradient_edge", None)
    return get(param).node if get is not None else None


def leaves_out_nodes(reached: list[Any]) -> bool:
    """Whether the running backward skips part of the graph below ``reached``.

    A backward given ``inputs=`` (or ``torch.autograd.grad``) runs only the nodes on a path to
    those inputs; a plain ``backward()`` runs every node it can reach. Every node below a
    node the backward ran is reachable, so finding one that it will not run proves that it
    prunes the graph. Finding none proves nothing about the nodes outside the part walked.
    Must be called during the backward (its engine callbacks included).

    Args:
        reached: backward nodes the running backward executed, not in a reentrant backward
            inside it (``None`` entries are ignored).

    Returns:
        ``True`` where a node below one of ``reached`` will not run, or where torch cannot
        be asked (no ``_will_engine_execute_node``).
    """
    check = getattr(torch._C, "_will_engine_execute_node", None)
    if check is None:
        return True
    seen: set[Any] = set()
    stack = [node for node in reached if node is not None]
    while stack:
        for following, _ in stack.pop().next_functions:
            if following is None or following in seen:
                continue
            seen.add(following)
            try:
                if not check(following):
                    return True
            except RuntimeError:
                # torch.autograd.grad refuses to answer for a leaf it returns the gradient
                # of: that gradient is formed, and a leaf has nothing below it.
                continue
            stack.append(following)
    return False


def sum_hook(
    sums: dict[str, Tensor], name: str, slot: int, param: Tensor
) -> Callable[[tuple[Tensor | None, ...], tuple[Tensor | None, ...]], None]:
    """A node post-hook storing the gradient the node sends along ``slot`` in
    ``sums[name]``. The tensor is autograd's own: holding it makes ``AccumulateGrad`` copy it
    into ``.grad`` rather than adopt it (and never accumulate into it), so later changes to
    ``.grad`` do not reach it. ``sums`` is the dict of one backward: a hook left on a graph
    kept for a second backward writes into that stale dict, which nothing reads."""

    def hook(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]):
        grad = grad_inputs[slot]
        # An undefined gradient is autograd's zero.
        sums[name] = grad if grad is not None else torch.zeros_like(param.detach())

    return hook
