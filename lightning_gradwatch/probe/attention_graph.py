"""Where ``nn.MultiheadAttention``'s projections sit in its own backward graph.

``F.multi_head_attention_forward`` projects queries, keys and values with
``linear(x, in_proj_weight, in_proj_bias)``: one packed call when they are one tensor
(self-attention), else one call per distinct input on row blocks of the weight (``split``
for a shared key/value tensor, ``chunk`` for three tensors). It then runs the attention core
and projects the result with ``linear(core, out_proj.weight, out_proj.bias)``. Each
``linear`` leaves one matrix-product node in the graph (``AddmmBackward0``, or
``MmBackward0`` followed by the bias's ``AddBackward0``) whose weight edge runs through a
``TBackward0`` (and the split's node, for a row block) into the parameter's
``AccumulateGrad``. Those nodes hold everything the per-sample gradients need, with nothing
recomputed:

* the output projection's node saved its input, the attention core's output ``(L*B, E)``; its
  gradient is the module's output gradient;
* each input projection's node saved its input ``(n*B, E)`` (``n`` = ``L`` for queries, ``S``
  for keys and values), and the gradient it receives during the backward is the backprop at
  its projected rows of ``in_proj_weight``, whatever the core did (masks, dropout, returned
  attention weights).

Rows are in the functional form's position-major ``(n, B)`` order. Any other graph (another
torch, autocast casts, several calls) gives ``None``, and the rule replays the attention core
instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from torch import Tensor, nn

from .call_edges import _LAYER_NODES

#: Shape-only nodes between the module's output and its output projection's product.
_RESHAPES = frozenset({"TransposeBackward0", "ViewBackward0", "UnsafeViewBackward0"})
#: Nodes that hand a row block of a parameter to a product (``split``, ``chunk``).
_SPLITS = frozenset({"SplitBackward0", "SplitWithSizesBackward0"})
#: Bound on the nodes visited between the projections (the core is about 20 nodes; the
#: explicit softmax form with returned weights about 30): a larger graph is not this module's.
_MAX_NODES = 200


@dataclass
class Projection:
    """One input projection product of an attention call.

    Attributes:
        node: the product node; its gradient output during the backward is ``(n*B, stop -
            start)``, the backprop at the projected rows.
        input: ``(n*B, E)`` the projection's input, as the product saved it.
        input_slot: the slot of ``node``'s gradient inputs holding the gradient of ``input``.
        weight_slot: the slot holding the gradient of the transposed weight rows ``(E, R)``,
            this call's part of the batch gradient of those rows.
        start, stop: the rows of ``in_proj_weight`` (and ``in_proj_bias``) it uses.
    """

    node: Any
    input: Tensor
    input_slot: int
    weight_slot: int
    start: int
    stop: int


@dataclass
class AttentionNodes:
    """The projection products of one ``nn.MultiheadAttention`` call.

    Attributes:
        core: ``(L*B, E)`` the output projection's input (the attention core's output);
            ``None`` when the product did not save it.
        projections: the input projections, by their first row (they tile ``0:3E``).
    """

    core: Tensor | None
    projections: list[Projection]


def _rows_behind(edge: Any, param: Tensor) -> tuple[int, int] | None:
    """The rows of ``param`` an edge carries the gradient of: all of them when it leads into
    ``param``'s ``AccumulateGrad``, a block of dim 0 through a split; through one
    ``TBackward0`` at most. ``None`` for anything else."""
    node, slot = edge
    if node is not None and node.name() == "TBackward0":
        inner = node.next_functions
        if len(inner) != 1:
            return None
        node, slot = inner[0]
    if node is None:
        return None
    if type(node).__name__ == "AccumulateGrad":
        return (0, param.shape[0]) if getattr(node, "variable", None) is param else None
    if node.name() not in _SPLITS:
        return None
    inner = node.next_functions
    if len(inner) != 1 or _rows_behind(inner[0], param) != (0, param.shape[0]):
        return None
    try:
        if node._saved_dim not in (0, -param.dim()):
            return None
        if node.name() == "SplitBackward0":
            size = node._saved_split_size
            start = slot * size
            return (start, min(start + size, param.shape[0]))
        sizes = node._saved_split_sizes
    except (AttributeError, RuntimeError):
        return None
    start = sum(sizes[:slot])
    return (start, start + sizes[slot])


def _product(
    node: Any, weight: Tensor, bias: Tensor | None
) -> tuple[str, int, int, tuple[int, int], tuple[int, int] | None] | None:
    """``(saved input attribute, input slot, bias slot or -1, weight rows, bias rows)`` when
    ``node`` is a ``linear`` product with rows of ``weight`` (and ``bias`` inside it, or
    none of it); ``None`` otherwise."""
    name = node.name()
    layout = _LAYER_NODES.get(name)
    if layout is None or name == "ConvolutionBackward0":
        return None
    saved_name, input_slot, param_slots = layout
    edges = node.next_functions
    if len(edges) <= max(input_slot, *param_slots):
        return None
    rows = _rows_behind(edges[param_slots[-1]], weight)
    if rows is None:
        return None
    bias_slot = param_slots[0] if len(param_slots) == 2 else -1
    bias_rows = None
    if bias_slot >= 0 and edges[bias_slot][0] is not None:
        # A bias that needs no gradient has no edge; one that does must be this one.
        bias_rows = _rows_behind(edges[bias_slot], bias) if bias is not None else None
        if bias_rows is None:
            return None
    return saved_name, input_slot, bias_slot, rows, bias_rows


def _saved(node: Any, name: str) -> Tensor | None:
    try:  # freed (a second backward) or never saved (a frozen weight needs no input)
        value = getattr(node, name)
    except RuntimeError:
        return None
    return value if isinstance(value, Tensor) else None


def attention_nodes(
    output_node: Any, module: nn.MultiheadAttention, query_rows: int, key_rows: int
) -> AttentionNodes | None:
    """The projections of the attention call whose output's backward node is
    ``output_node``, or ``None`` unless the graph has exactly the expected shape.

    Args:
        output_node: the ``grad_fn`` of the call's first output (the node being run when its
            gradient is delivered).
        module: the attention module (one ``in_proj_weight`` for queries, keys and values).
        query_rows: ``L * B``, the number of projected query positions of the call.
        key_rows: ``S * B``, the number of projected key (and value) positions.
    """
    weight = module.in_proj_weight
    if output_node is None or weight is None or not weight.requires_grad:
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
    if layout is None or layout[3] != (0, out_w.shape[0]):
        return None
    if out_b is not None and layout[2] >= 0 and layout[4] != (0, out_w.shape[0]):
        return None
    core = _saved(node, layout[0])
    if core is not None and core.shape != (query_rows, module.embed_dim):
        return None
    # Breadth-first through the core, down to the input projections; not beyond them.
    found: list[tuple[Any, tuple[str, int, int, tuple[int, int], tuple[int, int] | None]]] = []
    bias_adds: list[tuple[Any, tuple[int, int]]] = []
    queue = [node.next_functions[layout[1]][0]]
    seen: set[int] = set()
    while queue:
        current = queue.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if len(seen) > _MAX_NODES:
            return None
        product = _product(current, weight, in_b)
        if product is not None:
            found.append((current, product))
            continue
        edges = current.next_functions
        if in_b is not None and current.name() not in _SPLITS:
            for edge in edges:
                rows = _rows_behind(edge, in_b)
                if rows is not None:
                    bias_adds.append((current, rows))
        queue.extend(e[0] for e in edges)
    found.sort(key=lambda f: f[1][3])
    blocks = [f[1][3] for f in found]
    if not blocks or blocks[0][0] != 0 or blocks[-1][1] != weight.shape[0]:
        return None
    if any(a[1] != b[0] for a, b in pairwise(blocks)):
        return None  # the products do not tile the weight's rows exactly once
    projections = []
    mm_products = 0
    for product, (saved_name, input_slot, bias_slot, rows, bias_rows) in found:
        if in_b is not None:
            if bias_slot >= 0:
                if bias_rows != rows:
                    return None
            else:
                mm_products += 1
                if not _bias_added_to(product, rows, bias_adds, in_b):
                    return None
        saved = _saved(product, saved_name)
        expected = query_rows if rows[0] == 0 else key_rows
        if saved is None or saved.shape != (expected, module.embed_dim):
            return None
        weight_slot = _LAYER_NODES[product.name()][2][-1]
        projections.append(Projection(product, saved, input_slot, weight_slot, *rows))
    if in_b is not None and len(bias_adds) != mm_products:
        return None  # the bias is used elsewhere in the call too
    return AttentionNodes(core, projections)


def _bias_added_to(
    product: Any, rows: tuple[int, int], adds: list[tuple[Any, tuple[int, int]]], bias: Tensor
) -> bool:
    """Whether the bias rows of a ``MmBackward0`` product enter exactly as ``linear`` adds
    them: by one ``AddBackward0`` right over it (through reshapes)."""
    for add, bias_rows in adds:
        if bias_rows != rows or add.name() != "AddBackward0":
            continue
        edges = add.next_functions
        if len(edges) != 2 or _rows_behind(edges[1], bias) != rows:
            return False
        node = edges[0][0]
        for _ in range(3):
            if node is product:
                return True
            if node is None or node.name() not in _RESHAPES or len(node.next_functions) != 1:
                return False
            node = node.next_functions[0][0]
        return node is product
    return False
