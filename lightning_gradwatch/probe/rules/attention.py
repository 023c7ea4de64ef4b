"""``nn.MultiheadAttention``: ``in_proj`` and ``out_proj`` as outer products.

The attention module uses ``out_proj.weight`` directly (through
``F.multi_head_attention_forward``) without calling ``out_proj``, so this rule owns every
parameter beneath the module.

Both projections are linear maps applied per position, so their per-sample gradients are the
usual ``sum_t delta_t a_t^T``. Only the backprops at the projected queries, keys and values are
hidden inside the functional call. Autograd has them: the rule reads them, with the
projections' inputs, from the call's own backward graph (``attention_graph.py``), so nothing
is recomputed and masks, dropout and the core's kernel do not matter.

Where that graph is not read (a call whose gradients all arrive only at the end of the
backward, such as one returning attention weights nobody uses; 16-bit precision; a graph of
another shape), the rule recovers the backprops by replaying the attention core once, batched,
on the projected inputs (identity projections, which are exact in floating point) and taking
one vector-Jacobian product: about one attention forward and backward, far less than
replaying the module per sample.

Configurations neither mirrors (``add_bias_kv``, ``add_zero_attn``, separate q/k/v projection
weights, the module called several times in one forward, parameters shared with another
module, and for the replay also dropout and gradients flowing into the returned attention
weights) use the generic per-sample ``torch.func`` replay of :class:`FallbackRule`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._linalg import bias_stats, outer_product_moments, rowdot
from ..attention_graph import Projection, attention_nodes
from ..call_edges import current_node, will_run
from ..registry import Call, ParamStats, RuleContext, SkipModule, register_rule
from .fallback import FallbackRule

#: Dtypes whose gradients autograd forms as the per-sample algebra does (16-bit ones are
#: rounded differently from a float32 replay: they keep the replay's behaviour).
_EXACT_DTYPES = (torch.float32, torch.float64)


#: One input projection's share of ``in_proj``'s statistics: the weight's (its row block of
#: the sums, its terms of the per-sample sums) and the bias's per-sample rows ``(B, R)``.
_Share = tuple[ParamStats | None, Tensor | None]


def _combine(
    parts: dict[int, _Share],
    pending: dict[str, ParamStats],
    bias: Tensor | None,
    ctx: RuleContext,
) -> None:
    """``in_proj``'s statistics from its projections' shares (keyed by their first row) into
    ``pending``: the per-sample terms add up, the row blocks of the sums stack up."""
    ordered = [parts[start] for start in sorted(parts)]

    def stacked(blocks: list[Tensor], dim: int) -> Tensor:
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim)

    if "in_proj_weight" in pending:
        shares = [weight for weight, _ in ordered if weight is not None]
        stats = pending["in_proj_weight"]
        stats.dot, stats.sq_norm = shares[0].dot, shares[0].sq_norm
        for share in shares[1:]:
            stats.dot = stats.dot + share.dot
            stats.sq_norm = stats.sq_norm + share.sq_norm
        sums = [s.sum_sq for s in shares]
        stats.sum_sq = stacked(sums, 0) if all(t is not None for t in sums) else None
        grad_sums = [s.grad_sum for s in shares]
        stats.grad_sum = stacked(grad_sums, 0) if all(t is not None for t in grad_sums) else None
    if "in_proj_bias" in pending:
        assert bias is not None
        filled = bias_stats(
            stacked([rows for _, rows in ordered if rows is not None], 1),
            bias.detach().to(ctx.dtype),
            ctx.need_sum_sq,
            False,
        )
        stats = pending["in_proj_bias"]
        stats.dot, stats.sq_norm = filled.dot, filled.sq_norm
        stats.sum_sq, stats.grad_sum = filled.sum_sq, filled.grad_sum


def _positions_dot(delta: Tensor, z: Tensor) -> Tensor:
    """``sum_t delta[:, t] . z[:, t]`` of two ``(B, L, E)`` tensors (any strides): ``(B,)``."""
    return torch.linalg.vecdot(delta, z).sum(1)


def _out_proj_stats(
    module: nn.MultiheadAttention, call: Call, core: Tensor, delta: Tensor, ctx: RuleContext
) -> ParamStats:
    """``out_proj.weight``'s statistics from the attention core's output ``core`` (its input)
    and the module's output gradient ``delta``, both ``(B, L, E)`` in ``ctx.dtype`` (any
    strides). ``<G_i, W> = sum_t delta_t . (z_t - b)`` from the module's output when it is
    intact, else from ``core`` projected again."""
    dtype = ctx.dtype
    if call.output_intact():
        z = call.outputs[0].to(dtype)
        z = z if module.batch_first else z.transpose(0, 1)
        bias = module.out_proj.bias
        z = z - bias.detach().to(dtype) if bias is not None else z
    else:
        z = core @ module.out_proj.weight.detach().to(dtype).T
    sq_norm, sum_sq, _, grad_sum = outer_product_moments(
        core.unsqueeze(2),
        delta.unsqueeze(2),
        ctx.need_sum_sq,
        False,
        ctx.chunk_elements,
        need_sum=ctx.need_grad_sum,
    )
    return ParamStats(
        dot=_positions_dot(delta, z),
        sq_norm=sq_norm,
        sum_sq=sum_sq.squeeze(0) if sum_sq is not None else None,
        grad_sum=grad_sum.squeeze(0) if grad_sum is not None else None,
    )


def _same_tensor(x: Tensor, y: Tensor) -> bool:
    """Whether two arguments are views of the same memory with the same layout, hence the same
    values (the probe may hand a rule distinct tensor objects for one tensor passed twice)."""
    return (
        x.data_ptr() == y.data_ptr()
        and x.shape == y.shape
        and x.stride() == y.stride()
        and x.dtype == y.dtype
    )


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(FallbackRule):
    recursive = True

    def batch_dim(self, module: nn.Module) -> int:
        assert isinstance(module, nn.MultiheadAttention)
        return 0 if module.batch_first else 1

    def sample_dims(
        self, module: nn.Module, call: Call, leaves: list[Any], bdim: int, batch: int
    ) -> list[int | None]:
        """``key_padding_mask`` is ``(B, S)`` in both layouts; a 3-D ``attn_mask`` is
        ``(B * num_heads, L, S)``, per-sample along dim 0 only with one head."""
        assert isinstance(module, nn.MultiheadAttention)
        arg = inspect.signature(module.forward).bind(*call.args, **call.kwargs).arguments
        padding, mask = arg.get("key_padding_mask"), arg.get("attn_mask")
        if isinstance(mask, Tensor) and mask.dim() == 3 and module.num_heads > 1:
            raise SkipModule(
                f"a 3-D attn_mask {tuple(mask.shape)} interleaves samples and heads, which "
                f"the per-sample replay cannot split; pass a 2-D attn_mask and a "
                f"key_padding_mask instead"
            )
        dims = super().sample_dims(module, call, leaves, bdim, batch)
        for k, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor) and (leaf is padding or leaf is mask):
                dims[k] = 0 if leaf.dim() == 3 or leaf is padding else None
                if leaf.dim() == 2 and leaf is padding and leaf.shape[0] != batch:
                    raise SkipModule(f"key_padding_mask {tuple(leaf.shape)} is not (B, S)")
        return dims

    @staticmethod
    def _replayable(module: nn.MultiheadAttention, calls: list[Call], ctx: RuleContext) -> bool:
        return (
            len(calls) == 1
            and module._qkv_same_embed_dim
            and module.bias_k is None
            and not module.add_zero_attn
            and not (module.training and module.dropout > 0)
            and all(g is None for g in calls[0].grads[1:])
            and not ctx.need_grad_sample
        )

    # The attention output's gradient arrives before the input projections run, and the
    # graph route reads everything else from the projections' own gradients, which include
    # whatever reaches them through the attention weights (need_weights=True). So it need not
    # wait for the weights' gradient, which never arrives where the loss does not use them.
    computes_early = True

    @staticmethod
    def _graph_readable(module: nn.MultiheadAttention, calls: list[Call], ctx: RuleContext) -> bool:
        return (
            len(calls) == 1
            and module._qkv_same_embed_dim
            and module.bias_k is None
            and not module.add_zero_attn
            and not ctx.need_grad_sample
        )

    def compute_early(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats] | None:
        assert isinstance(module, nn.MultiheadAttention)
        if not self._graph_readable(module, calls, ctx) or calls[0].grads[0] is None:
            return None
        return self._from_graph(module, calls[0], ctx)

    def compute(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats]:
        assert isinstance(module, nn.MultiheadAttention)
        if self._graph_readable(module, calls, ctx):
            read = self._from_graph(module, calls[0], ctx)
            if read is not None:
                return read
        if not self._replayable(module, calls, ctx):
            return super().compute(module, calls, ctx)
        return self._replay(module, calls[0], ctx)

    def _from_graph(
        self, module: nn.MultiheadAttention, call: Call, ctx: RuleContext
    ) -> dict[str, ParamStats] | None:
        """The statistics read from the call's own backward graph (see ``attention_graph.py``):
        ``out_proj``'s now, ``in_proj``'s when the backward has run every input projection,
        which fills in the :class:`ParamStats` returned here before the probe assembles them.
        ``None`` where the graph does not have exactly the expected shape."""
        grad = call.grads[0]
        if (
            grad is None
            or grad.dtype not in _EXACT_DTYPES
            or module.in_proj_weight.dtype not in _EXACT_DTYPES
        ):
            return None
        bound = inspect.signature(module.forward).bind(*call.args, **call.kwargs).arguments
        query, key = bound.get("query"), bound.get("key")
        if not (isinstance(query, Tensor) and query.dim() == 3 and isinstance(key, Tensor)):
            return None
        steps, batch = (query.shape[1], query.shape[0]) if module.batch_first else query.shape[:2]
        keys = key.shape[1] if module.batch_first else key.shape[0]
        nodes = attention_nodes(current_node(), module, steps * batch, keys * batch)
        want_in = [n for n in ("in_proj_weight", "in_proj_bias") if n in ctx.want]
        if nodes is None or (want_in and not all(will_run(p.node) for p in nodes.projections)):
            return None
        if nodes.core is None and "out_proj.weight" in ctx.want:
            return None
        dtype, embed = ctx.dtype, module.embed_dim
        out: dict[str, ParamStats] = {}
        # (B, L, E) views of the (L*B, E) rows, and of the module's output gradient.
        delta = grad if module.batch_first else grad.transpose(0, 1)
        delta = delta.to(dtype)
        b_out = module.out_proj.bias
        b_out = b_out.detach().to(dtype) if b_out is not None else None
        if "out_proj.weight" in ctx.want:
            assert nodes.core is not None
            core = nodes.core.to(dtype).view(steps, batch, embed).transpose(0, 1)
            out["out_proj.weight"] = _out_proj_stats(module, call, core, delta, ctx)
        if b_out is not None and "out_proj.bias" in ctx.want:
            out["out_proj.bias"] = bias_stats(delta.sum(1), b_out, ctx.need_sum_sq, False)
        if not want_in:
            return out
        # Filled in once the hooks below have all run. NaN until then: they run in this
        # backward (the engine said it executes their nodes), before the probe assembles.
        unset = grad.new_full((batch,), float("nan"), dtype=dtype)
        pending = {n: ParamStats(dot=unset, sq_norm=unset) for n in want_in}
        out.update(pending)
        parts: dict[int, _Share] = {}
        for projection in nodes.projections:
            handle: list[Any] = []

            def fill(
                grad_inputs: tuple[Tensor | None, ...],
                grad_outputs: tuple[Tensor | None, ...],
                projection: Projection = projection,
                handle: list[Any] = handle,
            ) -> None:
                handle[0].remove()  # one backward only: the graph may be kept for another
                parts[projection.start] = self._fill_in_proj(
                    module, projection, grad_inputs, grad_outputs[0], batch, ctx, want_in
                )
                if len(parts) == len(nodes.projections):
                    _combine(parts, pending, module.in_proj_bias, ctx)

            handle.append(projection.node.register_hook(fill))
        return out

    @staticmethod
    def _fill_in_proj(
        module: nn.MultiheadAttention,
        projection: Projection,
        grad_inputs: tuple[Tensor | None, ...],
        grad_rows: Tensor | None,
        batch: int,
        ctx: RuleContext,
        want: list[str],
    ) -> _Share:
        """One input projection's share of ``in_proj``'s statistics (its rows of the
        per-sample gradients), from its input ``(n*B, E)`` and the gradient at its output
        ``grad_rows`` ``(n*B, R)``: the weight's ``sum_sq``/``grad_sum`` hold its ``R`` rows
        only, ``dot`` and ``sq_norm`` its terms of the sums over rows; the bias's per-sample
        gradient rows ``(B, R)``."""
        dtype, embed = ctx.dtype, module.embed_dim
        rows = projection.stop - projection.start
        a = projection.input.to(dtype)
        steps = a.shape[0] // batch
        if grad_rows is None:  # autograd's zero
            grad_rows = a.new_zeros(a.shape[0], rows)
        d = grad_rows.to(dtype).view(steps, batch, rows)
        weight_share = bias_rows = None
        if "in_proj_weight" in want:
            weight = module.in_proj_weight.detach()[projection.start : projection.stop]
            # <G_i, W> = sum_t d_t . (W a_t) = sum_t (W^T d_t) . a_t: autograd's own gradient
            # at the input when it formed one.
            d_a = grad_inputs[projection.input_slot]
            if d_a is None:
                d_a = grad_rows.to(dtype) @ weight.to(dtype)
            a_b = a.view(steps, batch, embed)
            dot = torch.linalg.vecdot(a_b, d_a.to(dtype).view(steps, batch, embed)).sum(0)
            # The batch gradient of these rows: autograd formed exactly this call's part of it
            # at the weight edge (float32/64 only come here). A copy, so that nothing autograd
            # later does with its tensor reaches it.
            edge_sum = grad_inputs[projection.weight_slot] if ctx.need_sum_sq else None
            sq_norm, sum_sq, _, grad_sum = outer_product_moments(
                a_b.transpose(0, 1).unsqueeze(2),
                d.transpose(0, 1).unsqueeze(2),
                ctx.need_sum_sq,
                False,
                ctx.chunk_elements,
                need_sum=ctx.need_grad_sum and edge_sum is None,
            )
            if edge_sum is not None and ctx.need_grad_sum:
                grad_sum = edge_sum.t().to(dtype).clone(memory_format=torch.contiguous_format)
                grad_sum = grad_sum.unsqueeze(0)
            weight_share = ParamStats(
                dot=dot,
                sq_norm=sq_norm,
                sum_sq=sum_sq.squeeze(0) if sum_sq is not None else None,
                grad_sum=grad_sum.squeeze(0) if grad_sum is not None else None,
            )
        if "in_proj_bias" in want:
            bias_rows = d.sum(0)  # (B, R): squared once every block is in
        return weight_share, bias_rows

    def _replay(
        self, module: nn.MultiheadAttention, call: Call, ctx: RuleContext
    ) -> dict[str, ParamStats]:
        """The statistics from one batched replay of the attention core (see the module
        docstring), for graphs :meth:`_from_graph` does not read."""
        bound = inspect.signature(module.forward).bind(*call.args, **call.kwargs)
        bound.apply_defaults()
        arg = bound.arguments
        dtype = ctx.dtype

        def seq_first(x: Tensor) -> Tensor:  # (L, B, E), as the functional form expects
            x = x.to(dtype)
            return x.transpose(0, 1) if module.batch_first else x

        def batch_major(x: Tensor) -> Tensor:  # (L, B, E) -> (B, L, E)
            return x.transpose(0, 1)

        def as_mask(mask: Tensor | None) -> Tensor | None:
            return mask.to(dtype) if mask is not None and mask.is_floating_point() else mask

        query, key, value = (seq_first(arg[n]) for n in ("query", "key", "value"))
        w_in = module.in_proj_weight.detach().to(dtype)
        b_in = module.in_proj_bias.detach().to(dtype) if module.in_proj_bias is not None else None
        w_out = module.out_proj.weight.detach().to(dtype)
        b_out = (
            module.out_proj.bias.detach().to(dtype) if module.out_proj.bias is not None else None
        )
        w_q, w_k, w_v = w_in.chunk(3)
        b_q, b_k, b_v = b_in.chunk(3) if b_in is not None else (None, None, None)

        grad = call.grads[0]
        assert grad is not None
        inputs = [batch_major(x) for x in (query, key, value)]  # (B, L, E) views
        delta_b = batch_major(seq_first(grad))  # (B, L, E)
        d_core = delta_b @ w_out
        unmasked = (
            arg["key_padding_mask"] is None and arg["attn_mask"] is None and not arg["is_causal"]
        )
        with torch.enable_grad():
            projected = [
                F.linear(x, w, None).detach().requires_grad_()
                for x, w in zip(inputs, (w_q, w_k, w_v), strict=True)
            ]
            biased = [
                p + b if b is not None else p
                for p, b in zip(projected, (b_q, b_k, b_v), strict=True)
            ]
            if unmasked:
                core = self._attention_core(biased, module.num_heads)
            else:
                core = batch_major(
                    self._functional_core(
                        [batch_major(x) for x in biased], module, arg, as_mask, dtype
                    )
                )
            grads = list(torch.autograd.grad(core, projected, d_core))  # (B, L, E) each

        out: dict[str, ParamStats] = {}
        core_b = core.detach()
        if "out_proj.weight" in ctx.want:
            out["out_proj.weight"] = _out_proj_stats(module, call, core_b, delta_b, ctx)
        if b_out is not None and "out_proj.bias" in ctx.want:
            out["out_proj.bias"] = bias_stats(delta_b.sum(1), b_out, ctx.need_sum_sq, False)

        if "in_proj_weight" in ctx.want:
            dot = sum(rowdot(d, p.detach()) for d, p in zip(grads, projected, strict=True))
            self_attention = _same_tensor(arg["query"], arg["key"]) and _same_tensor(
                arg["key"], arg["value"]
            )
            if self_attention:
                # One input: the three projections are one linear map with 3E outputs, so the
                # input's Gram matrix is formed once.
                a = inputs[0].unsqueeze(2)
                d_all = torch.cat(grads, -1).unsqueeze(2)
                sq_norm, sum_sq, _, grad_sum = outer_product_moments(
                    a, d_all, ctx.need_sum_sq, False, ctx.chunk_elements, ctx.need_grad_sum
                )
            elif query.shape[0] == key.shape[0]:
                # Same length: the three projections are three groups of one outer product.
                sq_norm, sum_sq, _, grad_sum = outer_product_moments(
                    torch.stack(inputs, 2),
                    torch.stack(grads, 2),
                    ctx.need_sum_sq,
                    False,
                    ctx.chunk_elements,
                    need_sum=ctx.need_grad_sum,
                )
            else:
                parts = [
                    outer_product_moments(
                        a.unsqueeze(2),
                        d.unsqueeze(2),
                        ctx.need_sum_sq,
                        False,
                        ctx.chunk_elements,
                        need_sum=ctx.need_grad_sum,
                    )
                    for a, d in zip(inputs, grads, strict=True)
                ]
                sq_norm = sum(p[0] for p in parts)
                sum_sq = torch.cat([p[1] for p in parts]) if ctx.need_sum_sq else None
                sums = [p[3] for p in parts]
                grad_sum = torch.cat(sums) if all(t is not None for t in sums) else None
            out["in_proj_weight"] = ParamStats(
                dot=dot,
                sq_norm=sq_norm,
                sum_sq=sum_sq.reshape(w_in.shape) if sum_sq is not None else None,
                grad_sum=grad_sum.reshape(w_in.shape) if grad_sum is not None else None,
            )
        if b_in is not None and "in_proj_bias" in ctx.want:
            bias_grad = torch.cat([d.sum(1) for d in grads], -1)
            out["in_proj_bias"] = bias_stats(bias_grad, b_in, ctx.need_sum_sq, False)
        return out

    @staticmethod
    def _attention_core(biased: list[Tensor], heads: int) -> Tensor:
        """Scaled dot-product attention of projected ``(B, L, E)`` queries, keys and values
        without masks, as ``F.multi_head_attention_forward`` computes it (head ``h`` is columns
        ``h*E/H:(h+1)*E/H``): ``(B, L, E)``, before the output projection."""
        q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in biased)
        core = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, E/H)
        return core.transpose(1, 2).flatten(2)

    @staticmethod
    def _functional_core(
        biased: list[Tensor],
        module: nn.MultiheadAttention,
        arg: dict[str, Any],
        as_mask: Any,
        dtype: torch.dtype,
    ) -> Tensor:
        """The attention core through ``F.multi_head_attention_forward`` with identity
        projections (exact in floating point), so masks are merged exactly as the module merges
        them. Inputs ``(L, B, E)``, output ``(L, B, E)``."""
        embed = module.embed_dim
        eye = torch.eye(embed, dtype=dtype, device=biased[0].device)
        core, _ = F.multi_head_attention_forward(
            *biased,
            embed,
            module.num_heads,
            None,
            None,
            None,
            None,
            False,
            0.0,
            eye,
            None,
            training=module.training,
            key_padding_mask=as_mask(arg["key_padding_mask"]),
            need_weights=False,
            attn_mask=as_mask(arg["attn_mask"]),
            use_separate_proj_weight=True,
            q_proj_weight=eye,
            k_proj_weight=eye,
            v_proj_weight=eye,
            is_causal=arg["is_causal"],
        )
        return core
