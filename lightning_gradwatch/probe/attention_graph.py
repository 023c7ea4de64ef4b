"""Where ``nn.MultiheadAttention``'s two projections sit in its own backward graph.

``F.multi_head_attention_forward`` projects queries, keys and values with one packed
``linear(x, in_proj_weight, in_proj_bias)`` when they are one tensor (self-attention), runs the
attention core, and projects the result with ``linear(core, out_proj.weight, out_proj.bias)``.
Each ``linear`` leaves one matrix-product node in the graph (``AddmmBackward0``, or
``MmBackward0`` followed by the bias's ``AddBackward0``) whose weight edge runs through a
``TBackward0`` into the parameter's ``AccumulateGrad``. Those two nodes hold everything the
per-sample gradients need, with nothing recomputed:

* the output projection's node saved its input, the attention core's output ``(L*B, E)``; its
  gradient is the module's output gradient;
* the input projection's node saved its input ``(L*B, E)``, and the gradient it receives
  during the backward is the backprop at the projected queries, keys and values
  ``(L*B, 3E)``, whatever the core did (masks, dropout, returned attention weights).

Rows are in the functional form's ``(L, B)`` order (position-major). Any other graph (another
torch, autocast casts, separate projections, several calls) gives ``None``, and the rule
replays the attention core instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .call_edges import _LAYER_NODES

#: Shape-only nodes between the module's output and its output projection's product.
_RESHAPES = frozenset({"TransposeBackward0", "ViewBackward0", "UnsafeViewBackward0"})
#: Bound on the nodes visited between the two projections (the core is about 20 nodes; the
#: explicit softmax form with returned weights about 30): a larger graph is not this module's.
_MAX_NODES = 200


@dataclass
class AttentionNodes:
    """The two projection products of one ``nn.MultiheadAttention`` call.

    Attributes:
        core: ``(L*B, E)`` the output projection's input (the attention core's output).
        in_proj: the input projection's product node; its gradient output during the backward
            is ``(L*B, 3E)``.
        in_input: ``(L*B, E)`` the input projection's input, as the product saved it.
        in_input_slot: the slot of ``in_proj``'s gradient inputs holding the gradient of
            ``in_input`` (``None`` when the input needs none).
    """

    core: Tensor | None
    in_proj: Any
    in_input: Tensor
    in_input_slot: int


def _parameter_behind(edge: Any) -> Tensor | None:
    """The parameter an edge's node accumulates into, through one ``TBackward0`` at most."""
    node = edge[0]
    if node is not None and node.name() == "TBackward0":
        inner = node.next_functions
        node = inner[0][0] if len(inner) == 1 else None
    if node is None or type(node).__name__ != "AccumulateGrad":
        return None
    param = getattr(node, "variable", None)
    return param if isinstance(param, Tensor) else None


def _product(node: Any, weight: Tensor, bias: Tensor | None) -> tuple[str, int, int] | None:
    """``(saved input attribute, input slot, bias slot or -1)`` when ``node`` is a ``linear``
    product with ``weight`` (and ``bias`` inside it, or none of it); ``None`` otherwise."""
    layout = _LAYER_NODES.get(node.name())
    if layout is None or node.name() == "ConvolutionBackward0":
        return None
    saved_name, input_slot, param_slots = layout
    edges = node.next_functions
    if len(edges) <= max(input_slot, *param_slots):
        return None
    if _parameter_behind(edges[param_slots[-1]]) is not weight:
        return None
    bias_slot = param_slots[0] if len(param_slots) == 2 else -1
    if bias_slot >= 0:
        # A bias that needs no gradient has no edge; one that does must be this one.
        behind = edges[bias_slot][0]
        if (behind is not None or bias is not None) and _parameter_behind(
            edges[bias_slot]
        ) is not bias:
            return None
    return saved_name, input_slot, bias_slot


def _saved(node: Any, name: str) -> Tensor | None:
    try:  # freed (a second backward) or never saved (a frozen weight needs no input)
        value = getattr(node, name)
    except RuntimeError:
        return None
    return value if isinstance(value, Tensor) else None


def attention_nodes(
    output_node: Any, module: nn.MultiheadAttention, rows: int
) -> AttentionNodes | None:
    """The projections of the self-attention call whose output's backward node is
    ``output_node``, or ``None`` unless the graph has exactly the expected shape.

    Args:
        output_node: the ``grad_fn`` of the call's first output (the node being run when its
            gradient is delivered).
        module: the attention module (packed ``in_proj_weight``).
        rows: ``L * B``, the number of projected positions of the call.
    """
    if output_node is None or module.in_proj_weight is None:
        return None
    out_w, out_b = module.out_proj.weight, module.out_proj.bias
    in_b = module.in_proj_bias
    in_b = in_b if in_b is not None and in_b.requires_grad else None
    out_b = out_b if out_b is not None and out_b.requires_grad else None
    node = output_node
    for _ in range(3):  # (transpose,) view: the functional form's output reshapes
        if node.name() not in _RESHAPES:
            break
        if len(node.next_functions) != 1 or node.next_functions[0][0] is None:
            return None
        node = node.next_functions[0][0]
    layout = _product(node, out_w, out_b) if out_w.requires_grad else None
    if layout is None:
        return None
    core = _saved(node, layout[0])
    if core is not None and core.shape != (rows, module.embed_dim):
        return None
    # Breadth-first through the core, down to the input projection; not beyond it.
    found: list[tuple[Any, tuple[str, int, int]]] = []
    bias_adds = []
    queue = [node.next_functions[layout[1]][0]]
    seen: set[int] = set()
    while queue:
        current = queue.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if len(seen) > _MAX_NODES:
            return None
        product = _product(current, module.in_proj_weight, in_b)
        if product is not None:
            found.append((current, product))
            continue
        edges = current.next_functions
        if in_b is not None and any(_parameter_behind(e) is in_b for e in edges):
            bias_adds.append(current)
        queue.extend(e[0] for e in edges)
    if len(found) != 1:  # separate query/key/value projections, or not this module
        return None
    in_proj, (saved_name, input_slot, bias_slot) = found[0]
    if in_b is not None and not _bias_added_to(in_proj, bias_slot, bias_adds, in_b):
        return None
    in_input = _saved(in_proj, saved_name)
    if in_input is None or in_input.shape != (rows, module.embed_dim):
        return None
    return AttentionNodes(core, in_proj, in_input, input_slot)


def _bias_added_to(product: Any, bias_slot: int, adds: list[Any], bias: Tensor) -> bool:
    """Whether the input projection's bias enters exactly as ``linear`` adds it: inside the
    product (``addmm``), or by one ``AddBackward0`` right over it (through reshapes)."""
    if bias_slot >= 0:
        return not adds
    if len(adds) != 1 or adds[0].name() != "AddBackward0":
        return False
    edges = adds[0].next_functions
    if len(edges) != 2 or _parameter_behind(edges[1]) is not bias:
        return False
    node = edges[0][0]
    for _ in range(2):
        if node is product:
            return True
        if node is None or node.name() not in _RESHAPES or len(node.next_functions) != 1:
            return False
        node = node.next_functions[0][0]
    return node is product
