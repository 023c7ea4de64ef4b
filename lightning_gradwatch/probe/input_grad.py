"""A linear layer's ``<G_i, W>`` from the gradient autograd forms at the layer's input.

For one call ``z = W a + b`` with output gradients ``delta``, ``<G_i, W> = sum_t delta_t .
(W a_t) = sum_t (delta_t W) . a_t``, and ``delta W`` is exactly the gradient the call's
matrix-product node (``AddmmBackward0``/``MmBackward0``) sends to its input when the input
requires grad. Reading it there (in a one-shot post-hook on that node) lets the probe drop the
call's output ``z`` at the end of the forward rather than hold it until its gradient arrives:
autograd itself does not keep a linear layer's output, so holding it would add one
``(B, ..., out)`` tensor per layer to the memory at the start of the backward.

The node is identified at forward time from the output's ``grad_fn`` (one reshape at most
over the product, which must have saved this call's own input). A call whose input needs no
gradient (the first layer), whose output or input is not float32/float64 (autocast, 16-bit
models: the input gradient would be rounded), or whose graph has another shape keeps its
output instead. A backward that does not compute the input's gradient
(``backward(inputs=...)`` leaving it out, ``torch.autograd.grad``) makes the rule recompute
``W a`` (exact; one matrix product).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .call_edges import current_node, product_under, will_run

_EXACT_DTYPES = (torch.float32, torch.float64)


@dataclass(eq=False)
class InputGrad:
    """Where one linear call's input gradient appears during the backward, and what arrived.

    Attributes:
        node: the call's matrix-product node, found when the output's gradient arrives.
        slot: the slot of the node's gradient inputs holding the gradient at the layer input.
        input: the layer's input ``(..., in)`` (detached), as the call received it; dropped
            once the node has run.
        dots: ``input.shape[:-1]``, ``(delta_t W) . a_t`` at every position, set by the node's
            post-hook; ``None`` until then.
        arrived: set when the post-hook has run (``dots`` then holds the values).
        usable: ``False`` once the backward is known not to compute the input's gradient.
        on_arrival: called once ``dots`` is set (a rule whose result is waiting for it).
        batch_dim: the dim of ``dots`` that indexes samples.
    """

    node: Any
    slot: int
    input: Tensor | None
    dots: Tensor | None = None
    arrived: bool = False
    usable: bool = True
    on_arrival: list[Callable[[], None]] = field(default_factory=list)
    handle: Any = None
    batch_dim: int = 0

    def sample_dots(self, batch: int) -> Tensor:
        """``(B,)`` ``<G_i, W>`` of this call: ``dots`` summed over positions."""
        assert self.dots is not None
        dots = self.dots.movedim(self.batch_dim, 0) if self.batch_dim else self.dots
        return dots.reshape(batch, -1).sum(1) if dots.dim() != 1 else dots


def input_grad_route(output: Tensor, layer_input: Any) -> InputGrad | None:
    """A route for a linear call whose output is ``output`` and whose input is
    ``layer_input``, when autograd will form the gradient at that input (it requires grad)
    in float32/float64 from this call's own product node; ``None`` otherwise (the caller keeps
    the output). The route holds no reference to the node: a forward whose backward never
    comes must not keep its graph alive; :func:`watch` finds the node again.

    Args:
        output: the call's output ``(..., out)``, not detached.
        layer_input: the call's first argument ``(..., in)``.
    """
    if (
        not isinstance(layer_input, Tensor)
        or not layer_input.requires_grad
        or layer_input.dtype not in _EXACT_DTYPES
        or output.dtype not in _EXACT_DTYPES
        or layer_input.dim() < 1
        or (layer_input.dim() > 2 and not layer_input.is_contiguous())
    ):
        return None
    found = _product_node(output.grad_fn, layer_input)
    if found is None:
        return None
    return InputGrad(None, found[1], layer_input.detach())


def _product_node(node: Any, layer_input: Tensor) -> tuple[Any, int] | None:
    """``(the product node, the slot of its input's gradient)`` when ``node`` is (one reshape
    over) a matrix product that saved ``layer_input`` and sends a gradient to it."""
    found = product_under(node, layer_input)
    if found is None or found[1] == "ConvolutionBackward0":
        return None  # not the product of this call's own input
    node, _, input_slot, _ = found
    if node.next_functions[input_slot][0] is None:
        return None
    return node, input_slot


def watch(route: InputGrad) -> None:
    """Arrange for ``route.dots`` to be filled when the node runs in the running backward,
    or mark the route unusable when the backward does not compute the input's gradient.
    Called from the hook delivering the call's output gradient (before the node runs)."""
    if route.handle is not None or not route.usable or route.arrived:
        return
    # The node being run is the output's grad_fn (the output's hook runs as its pre-hook).
    found = _product_node(current_node(), route.input) if route.input is not None else None
    if found is None or found[1] != route.slot:
        route.usable = False
        return
    route.node = found[0]
    if not will_run(route.node.next_functions[route.slot][0]):
        route.usable = False
        return

    def fill(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]):
        route.handle.remove()  # one backward only: the graph may be kept for another
        route.handle = None
        layer_input = route.input
        assert layer_input is not None
        grad = grad_inputs[route.slot]
        if grad is None:  # autograd's zero
            route.dots = layer_input.new_zeros(layer_input.shape[:-1])
        else:
            # Reads autograd's tensor; never writes it.
            route.dots = torch.linalg.vecdot(grad.reshape(layer_input.shape), layer_input)
        route.input = route.node = None
        route.arrived = True
        for callback in route.on_arrival:
            callback()
        route.on_arrival.clear()

    route.handle = route.node.register_hook(fill)


def release(route: InputGrad) -> None:
    """Forget a route whose call the probe dropped: its hook, if it has not run, and its
    tensors."""
    if route.handle is not None and not route.arrived:
        route.handle.remove()
    route.input = route.node = route.handle = None
    route.dots = None
    route.usable = False
    route.on_arrival.clear()
