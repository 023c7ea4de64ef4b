"""``nn.MultiheadAttention`` statistics read from the call's own backward graph (no replay of
the attention core) against the float64 oracle, and the replay where the graph is not read."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_oracle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_gradwatch.probe import attention_graph
from lightning_gradwatch.probe.rules.attention import MultiheadAttentionRule

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class _SelfAttention(nn.Module):
    """Self-attention (one tensor as query, key and value) on ``(B, T, E)`` inputs, in either
    layout, optionally behind a Linear (so the input needs a gradient), under a mask, with
    dropout (reseeded on every forward so that the oracle's forward drops the same entries),
    and with the returned attention weights in the loss."""

    def __init__(
        self,
        embed: int,
        heads: int,
        batch_first: bool,
        bias: bool,
        mask: str,
        dropout: float,
        weights_in_loss: bool,
        pre: bool,
        need_weights: bool | None = None,
    ) -> None:
        super().__init__()
        # need_weights=True without the weights in the loss: an output that never gets a
        # gradient (nn.MultiheadAttention's default).
        self.need_weights = weights_in_loss if need_weights is None else need_weights
        self.pre = nn.Linear(embed, embed) if pre else nn.Identity()
        self.attn = nn.MultiheadAttention(
            embed, heads, dropout=dropout, bias=bias, batch_first=batch_first
        )
        self.batch_first, self.mask, self.weights_in_loss = batch_first, mask, weights_in_loss

    def forward(self, x: Tensor) -> Tensor:  # (B, T, E) -> (B, T, E)
        torch.manual_seed(1234)  # the same dropout entries in the probe's and oracle's forward
        batch, steps, _ = x.shape
        h = self.pre(x)
        h = h if self.batch_first else h.transpose(0, 1)
        kwargs: dict = {"need_weights": self.need_weights}
        if self.mask == "causal_float":
            kwargs["attn_mask"] = torch.triu(
                torch.full((steps, steps), float("-inf"), dtype=x.dtype), 1
            )
        elif self.mask == "is_causal":
            kwargs["attn_mask"] = torch.triu(torch.ones(steps, steps, dtype=torch.bool), 1)
            kwargs["is_causal"] = True
        elif self.mask == "bool":
            mask = torch.zeros(steps, steps, dtype=torch.bool)
            mask[:, -1] = steps > 1  # the last key hidden from every query (if another exists)
            kwargs["attn_mask"] = mask
        elif self.mask == "per_head":  # (B * heads, T, S): samples and heads interleaved
            mask = torch.zeros(batch * self.attn.num_heads, steps, steps, dtype=torch.bool)
            mask[-1, :, 0] = steps > 1
            kwargs["attn_mask"] = mask
        elif self.mask == "key_padding":
            padding = torch.zeros(batch, steps, dtype=torch.bool)
            padding[0, -1] = steps > 1
            kwargs["key_padding_mask"] = padding
        out, weights = self.attn(h, h, h, **kwargs)
        out = out if self.batch_first else out.transpose(0, 1)
        out = torch.tanh(out)
        if self.weights_in_loss:
            out = out + weights.pow(2).sum(-1, keepdim=True)  # (B, T, S) -> (B, T, 1)
        return out


def _graph_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if the attention rule does anything but read its graph."""

    def refuse(*args: object, **kwargs: object) -> bool:
        raise AssertionError("the attention rule did not read its backward graph")

    monkeypatch.setattr(MultiheadAttentionRule, "_replayable", staticmethod(refuse))


def _replays(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one for every replay of the attention core."""
    calls: list[int] = []
    replay = MultiheadAttentionRule._replay

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return replay(self, *args, **kwargs)

    monkeypatch.setattr(MultiheadAttentionRule, "_replay", counted)
    return calls


@SETTINGS
@given(
    batch=st.integers(1, 4),
    steps=st.integers(1, 5),
    heads=st.integers(1, 2),
    head_dim=st.integers(1, 3),
    batch_first=st.booleans(),
    bias=st.booleans(),
    mask=st.sampled_from(["none", "causal_float", "is_causal", "bool", "per_head", "key_padding"]),
    dropout=st.sampled_from([0.0, 0.3]),
    pre=st.booleans(),
    sum_grad_squared=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
    chunk_elements=st.sampled_from([1, 2**24]),
    need_weights=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_graph_route_matches_oracle(
    monkeypatch: pytest.MonkeyPatch,
    batch: int,
    steps: int,
    heads: int,
    head_dim: int,
    batch_first: bool,
    bias: bool,
    mask: str,
    dropout: float,
    pre: bool,
    sum_grad_squared: bool,
    reduction: str,
    chunk_elements: int,
    need_weights: bool,
    seed: int,
) -> None:
    """Masks (a per-head 3-D one too, which the replay refuses) and dropout are in the graph
    that is read, so all are exact without a replay. With ``need_weights=True`` (the
    module's default) and the weights unused, their gradient never arrives: the rule reads
    the graph when the output's does rather than replaying at the end of the backward, and
    the probe, with no output left to account for, walks no graph for a pruning backward."""
    import lightning_gradwatch.probe.finalize as finalize

    _graph_only(monkeypatch)
    walks: list[int] = []
    walk = finalize.leaves_out_nodes
    monkeypatch.setattr(finalize, "leaves_out_nodes", lambda nodes: walks.append(1) or walk(nodes))
    torch.manual_seed(seed)
    embed = heads * head_dim
    model = _SelfAttention(
        embed, heads, batch_first, bias, mask, dropout, False, pre, need_weights=need_weights
    ).double()
    x = torch.randn(batch, steps, embed, dtype=torch.float64)
    target = torch.randn(batch, steps, embed, dtype=torch.float64)
    stats = assert_matches_oracle(
        model,
        x,
        target,
        reduction=reduction,
        sum_grad_squared=sum_grad_squared,
        chunk_elements=chunk_elements,
    )
    assert not stats.excluded
    assert "attn.in_proj_weight" in stats.sq_norm
    assert not walks


@pytest.mark.parametrize("batch_first", [True, False])
def test_returned_weights_in_the_loss(batch_first: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients through the returned attention weights are in the graph too: the input
    projections' gradients include them. The graph is read in both layouts, whether the
    output's gradient arrives before the weights' (batch-first: read then, the weights'
    gradient ignored when it comes) or after (sequence-first)."""
    _graph_only(monkeypatch)
    replays = _replays(monkeypatch)
    torch.manual_seed(0)
    model = _SelfAttention(4, 2, batch_first, True, "bool", 0.0, True, True).double()
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    stats = assert_matches_oracle(model, x, torch.randn_like(x))
    assert not stats.excluded
    assert not replays  # the core replay does not mirror gradients through the weights


def test_retained_graph_after_an_early_read_is_not_probed() -> None:
    """A second backward through a graph kept with ``retain_graph=True`` reaches the call the
    first one read early: that backward has no statistics (one warning), not zeros."""
    from lightning_gradwatch import GradientProbe

    torch.manual_seed(5)
    model = _SelfAttention(4, 2, True, True, "none", 0.0, False, False, need_weights=True)
    x = torch.randn(3, 2, 4)
    probe = GradientProbe(model, verify="never")
    with probe:
        loss = model(x).pow(2).sum()
        loss.backward(retain_graph=True)
        assert probe.has_stats and "attn.in_proj_weight" in probe.stats.dot
        with pytest.warns(UserWarning, match="retain_graph=True"):
            loss.backward()
    assert not probe.has_stats


class _Encoder(nn.Module):
    """A transformer encoder layer on ``(B, T, E)`` inputs, in either layout, causal mask."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.batch_first = batch_first

    def forward(self, x: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        h = x if self.batch_first else x.transpose(0, 1)
        h = self.layer(h, src_mask=mask)
        return h if self.batch_first else h.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_reads_its_graph(batch_first: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    _graph_only(monkeypatch)
    torch.manual_seed(0)
    model = _Encoder(batch_first).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    for sum_grad_squared in (False, True):
        stats = assert_matches_oracle(
            model, x, torch.randn_like(x), sum_grad_squared=sum_grad_squared
        )
        assert not stats.excluded


class _CrossAttention(nn.Module):
    """Queries from the first ``steps`` positions of ``x`` (B, T, E), keys and values from its
    first ``keys`` positions after a Linear: one tensor for both (``split`` of the packed
    weight), or a separate value tensor (``chunk`` into three), in either layout, with a mask
    and dropout (reseeded)."""

    def __init__(
        self,
        embed: int,
        heads: int,
        batch_first: bool,
        bias: bool,
        steps: int,
        keys: int,
        shared: bool,
        mask: str,
        dropout: float,
    ) -> None:
        super().__init__()
        self.memory = nn.Linear(embed, embed)
        self.attn = nn.MultiheadAttention(
            embed, heads, dropout=dropout, bias=bias, batch_first=batch_first
        )
        self.batch_first, self.keys, self.shared, self.mask = batch_first, keys, shared, mask
        self.steps = steps

    def forward(self, x: Tensor) -> Tensor:  # (B, T, E) -> (B, steps, E)
        torch.manual_seed(1234)
        batch, steps = x.shape[0], self.steps
        k = self.memory(x[:, : self.keys])
        v = k if self.shared else torch.tanh(k)
        q = x[:, :steps]
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        kwargs: dict = {"need_weights": False}
        if self.mask == "key_padding":
            padding = torch.zeros(batch, self.keys, dtype=torch.bool)
            padding[0, -1] = self.keys > 1
            kwargs["key_padding_mask"] = padding
        elif self.mask == "attn":
            kwargs["attn_mask"] = torch.triu(torch.ones(steps, self.keys, dtype=torch.bool), 1) & (
                torch.arange(self.keys) > 0
            )
        out, _ = self.attn(q, k, v, **kwargs)
        return torch.tanh(out if self.batch_first else out.transpose(0, 1))


@SETTINGS
@given(
    batch=st.integers(1, 4),
    steps=st.integers(1, 5),
    keys=st.integers(1, 5),
    heads=st.integers(1, 2),
    head_dim=st.integers(1, 3),
    batch_first=st.booleans(),
    bias=st.booleans(),
    shared=st.booleans(),
    mask=st.sampled_from(["none", "key_padding", "attn"]),
    dropout=st.sampled_from([0.0, 0.3]),
    sum_grad_squared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cross_attention_reads_its_graph(
    monkeypatch: pytest.MonkeyPatch,
    batch: int,
    steps: int,
    keys: int,
    heads: int,
    head_dim: int,
    batch_first: bool,
    bias: bool,
    shared: bool,
    mask: str,
    dropout: float,
    sum_grad_squared: bool,
    seed: int,
) -> None:
    """Queries and keys/values of different lengths, projected by row blocks of the packed
    weight: every block's product is read, and the blocks stack up to the whole weight."""
    _graph_only(monkeypatch)
    torch.manual_seed(seed)
    embed = heads * head_dim
    model = _CrossAttention(
        embed, heads, batch_first, bias, steps, keys, shared, mask, dropout
    ).double()
    x = torch.randn(batch, max(steps, keys), embed, dtype=torch.float64)
    target = torch.randn(batch, steps, embed, dtype=torch.float64)
    stats = assert_matches_oracle(model, x, target, sum_grad_squared=sum_grad_squared)
    assert not stats.excluded
    assert "attn.in_proj_weight" in stats.sq_norm


def test_unrecognised_graph_replays(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph that is not read (here: larger than the walk allows) is replayed, exactly."""
    monkeypatch.setattr(attention_graph, "_MAX_NODES", 1)
    replays = _replays(monkeypatch)
    torch.manual_seed(0)
    model = _SelfAttention(4, 2, True, True, "none", 0.0, False, True).double()
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    stats = assert_matches_oracle(model, x, torch.randn_like(x))
    assert not stats.excluded
    assert replays


def test_frozen_output_projection_replays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a gradient for ``out_proj.weight`` its node cannot be recognised by its edge:
    the core is replayed for ``in_proj``, exactly."""
    replays = _replays(monkeypatch)
    torch.manual_seed(0)
    model = _SelfAttention(4, 2, True, True, "bool", 0.0, False, True).double()
    model.attn.out_proj.weight.requires_grad_(False)
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    stats = assert_matches_oracle(model, x, torch.randn_like(x))
    assert not stats.excluded
    assert replays


def test_graph_hook_is_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook placed on the input projection's node runs once: a graph kept for another
    backward (here without the probe) does not run it again."""
    from lightning_gradwatch import GradientProbe

    _graph_only(monkeypatch)
    fills: list[int] = []
    fill = MultiheadAttentionRule._fill_in_proj

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        fills.append(1)
        return fill(*args, **kwargs)

    monkeypatch.setattr(MultiheadAttentionRule, "_fill_in_proj", staticmethod(counted))
    torch.manual_seed(0)
    model = _SelfAttention(4, 2, True, True, "none", 0.0, False, True).double()
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    probe = GradientProbe(model)
    with probe:
        loss = model(x).pow(2).sum()
        loss.backward(retain_graph=True)
    assert fills == [1]
    assert probe.stats is not None and "attn.in_proj_weight" in probe.stats.names
    loss.backward()
    assert fills == [1]


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("cross", [False, True])
def test_graph_route_forms_its_own_batch_gradient(
    cross: bool, shared: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the probe cannot take ``grad_sum`` from autograd's whole gradient (a later step,
    or a use outside the modules), the rule forms it: from the projections' own weight edges
    for ``in_proj``, which must be exactly this call's part."""
    from lightning_gradwatch.probe.finalize import _Finalize

    monkeypatch.setattr(_Finalize, "_autograd_sum_exact", lambda *args: False)
    _graph_only(monkeypatch)
    torch.manual_seed(0)
    if cross:
        model = _CrossAttention(4, 2, True, True, 3, 2, shared, "none", 0.0).double()
    else:
        model = _SelfAttention(4, 2, shared, True, "bool", 0.0, False, True).double()
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    target = torch.randn(3, 3 if cross else 4, 4, dtype=torch.float64)
    stats = assert_matches_oracle(model, x, target, sum_grad_squared=True)
    assert not stats.excluded
