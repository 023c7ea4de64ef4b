"""Every layer rule and the fallback against the float64 per-sample oracle (rtol=1e-6)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_oracle, run_probe, squared_error
from torch import Tensor, nn

# The fallback replays nn.MultiheadAttention under vmap, which has no batching rule for the CPU
# flash-attention kernel yet: torch warns about speed, not correctness.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def _setup(seed: int = 0) -> None:
    torch.manual_seed(seed)


def _target_like(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    return torch.randn_like(out)


class _Tanh(nn.Module):
    """``layer`` followed by tanh, so the per-sample backprops depend on the sample."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.layer(x))


# --------------------------------------------------------------------------- Linear
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["2d", "3d", "4d"])
def test_linear(lead: tuple[int, ...], bias: bool, reduction: str) -> None:
    _setup()
    model = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 3, bias=bias))
    model = model.double()
    x = torch.randn(4, *lead, 5, dtype=torch.float64)
    assert_matches_oracle(model, x, _target_like(model, x), reduction=reduction)


def test_linear_single_sample() -> None:
    _setup()
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(1, 6, 3, dtype=torch.float64)
    assert_matches_oracle(model, x, _target_like(model, x))


# --------------------------------------------------------------------------- Conv
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_OPTIONS = {
    "plain": {},
    "stride": {"stride": 2},
    "padding": {"padding": 1},
    "same": {"padding": "same"},
    "same_dilated": {"padding": "same", "dilation": 2},
    "valid": {"padding": "valid"},
    "reflect": {"padding": 1, "padding_mode": "reflect"},
    "circular": {"padding": 2, "padding_mode": "circular"},
    "replicate_same": {"padding": "same", "padding_mode": "replicate"},
    "dilation": {"dilation": 2, "padding": 1},
    "groups": {"groups": 2},
    "depthwise": {"groups": 4, "padding": 1},
    "no_bias": {"bias": False},
    "everything": {"stride": 2, "padding": 2, "dilation": 2, "groups": 2, "bias": False},
}


@pytest.mark.parametrize("option", list(_CONV_OPTIONS))
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv(nd: int, option: str) -> None:
    _setup(nd)
    kwargs = _CONV_OPTIONS[option]
    kernel = 3 if nd < 3 else 2
    if kwargs.get("padding") == "same":
        kernel = 2  # an even kernel: "same" pads asymmetrically (unless dilated)
    conv = _CONV[nd](4, 4, kernel, **kwargs)
    model = nn.Sequential(conv, nn.Tanh()).double()
    spatial = {1: (11,), 2: (7, 6), 3: (5, 4, 5)}[nd]
    x = torch.randn(3, 4, *spatial, dtype=torch.float64)
    assert_matches_oracle(model, x, _target_like(model, x))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_conv_then_linear(reduction: str) -> None:
    _setup()
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    ).double()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    assert_matches_oracle(model, x, _target_like(model, x), reduction=reduction)


# --------------------------------------------------------------------------- Embedding
@pytest.mark.parametrize("padding_idx", [None, 0, -1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_embedding_duplicates_and_padding(padding_idx: int | None, reduction: str) -> None:
    _setup()
    model = nn.Sequential(nn.Embedding(6, 4, padding_idx=padding_idx), nn.Tanh(), nn.Linear(4, 2))
    model = model.double()
    # Every sample repeats indices; the padding row (0 or 5) appears too.
    x = torch.tensor([[1, 1, 0, 3, 1], [5, 2, 2, 2, 0], [4, 4, 4, 4, 4], [0, 5, 1, 3, 5]])
    assert_matches_oracle(model, x, _target_like(model, x), reduction=reduction)


def test_embedding_flat_indices() -> None:
    _setup()
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)).double()
    x = torch.tensor([1, 1, 4, 0])  # (B,): one token per sample, duplicated across samples
    assert_matches_oracle(model, x, _target_like(model, x))


def test_embedding_scale_grad_by_freq_is_excluded() -> None:
    _setup()
    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Linear(3, 2)).double()
    x = torch.tensor([[1, 1, 2], [1, 3, 4]])
    with pytest.warns(UserWarning, match="scale_grad_by_freq"):
        stats = run_probe(model, x, _target_like(model, x))
    assert "0.weight" in stats.excluded and "0.weight" not in stats.dot


# --------------------------------------------------------------------------- norms
@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: nn.LayerNorm(6), (4, 6)),
        (lambda: nn.LayerNorm(6), (4, 3, 6)),
        (lambda: nn.LayerNorm((3, 6)), (4, 2, 3, 6)),
        (lambda: nn.LayerNorm(6, bias=False), (4, 3, 6)),
        (lambda: nn.GroupNorm(2, 6), (4, 6, 5)),
        (lambda: nn.GroupNorm(3, 6), (4, 6, 3, 2)),
        (lambda: nn.RMSNorm(6), (4, 3, 6)),
        (lambda: nn.RMSNorm((3, 6), eps=1e-3), (4, 3, 6)),
    ],
    ids=["ln2d", "ln3d", "ln_multidim", "ln_nobias", "gn1d", "gn2d", "rms", "rms_multidim"],
)
def test_norm_layers(make, shape: tuple[int, ...]) -> None:
    _setup()
    norm = make()
    with torch.no_grad():  # non-trivial affine parameters
        for p in norm.parameters():
            p.normal_()
    model = _Tanh(norm).double()
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 1
    assert_matches_oracle(model, x, _target_like(model, x))


@pytest.mark.parametrize("nd", [1, 2])
def test_batchnorm_eval_mode_is_exact(nd: int) -> None:
    _setup()
    bn = nn.BatchNorm1d(4) if nd == 1 else nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    model = nn.Sequential(nn.Linear(3, 4) if nd == 1 else nn.Conv2d(3, 4, 1), bn, nn.Tanh())
    model = model.double().eval()
    x = torch.randn(5, 3, dtype=torch.float64) if nd == 1 else torch.randn(5, 3, 3, 3).double()
    assert_matches_oracle(model, x, _target_like(model, x))


def test_batchnorm_training_mode_is_excluded_with_one_warning() -> None:
    _setup()
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    model = model.double().train()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    from lightning_gradwatch import GradientProbe

    probe = GradientProbe(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with probe:
            for _ in range(3):
                squared_error(model(x), y).mean().backward()
    relevant = [w for w in caught if "BatchNorm" in str(w.message)]
    assert len(relevant) == 1, [str(w.message) for w in caught]
    assert "training mode" in str(relevant[0].message)
    stats = probe.stats
    assert set(stats.excluded) == {"1.weight", "1.bias"}
    assert "batch statistics" in stats.excluded["1.weight"]
    assert set(stats.names) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    with pytest.raises(KeyError, match="training mode"):
        stats.alignment(["1.weight"])


# --------------------------------------------------------------------------- fallback
class _Attention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.batch_first = batch_first

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, E)
        seq = x if self.batch_first else x.transpose(0, 1)
        out, _ = self.attn(seq, seq, seq)
        out = out if self.batch_first else out.transpose(0, 1)
        return torch.tanh(out)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_fallback(batch_first: bool) -> None:
    _setup()
    model = _Attention(batch_first).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    stats = assert_matches_oracle(model, x, _target_like(model, x))
    assert "attn.out_proj.weight" in stats.names


class _Scaled(nn.Module):
    """A custom module with its own parameters (no registered rule)."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim))
        self.mix = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(torch.tanh(x @ self.mix) * self.scale)


@pytest.mark.parametrize("lead", [(), (3,)], ids=["2d", "3d"])
def test_custom_parameter_module_fallback(lead: tuple[int, ...]) -> None:
    _setup()
    model = nn.Sequential(nn.Linear(3, 4), _Scaled(4), nn.Linear(4, 2)).double()
    x = torch.randn(5, *lead, 3, dtype=torch.float64)
    assert_matches_oracle(model, x, _target_like(model, x))


def test_dropout_inside_fallback_module_is_excluded() -> None:
    _setup()
    model = nn.Sequential(nn.Linear(3, 4), _Scaled(4, dropout=0.5), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="cannot be replayed"):
        stats = run_probe(model, x, y)
    assert {"1.scale", "1.mix"} <= set(stats.excluded)
    assert {"0.weight", "0.bias", "2.weight", "2.bias"} == set(stats.names)
    assert stats.is_finite()


def test_dropout_module_in_eval_mode_is_exact() -> None:
    _setup()
    model = nn.Sequential(nn.Linear(3, 4), _Scaled(4, dropout=0.5), nn.Linear(4, 2))
    model = model.double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert_matches_oracle(model, x, _target_like(model, x))


# --------------------------------------------------------------------------- reductions, scale
class _Mixed(nn.Module):
    """One of every rule, for the reduction / loss-scale / chunking tests."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.custom = _Scaled(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.emb(idx)  # (B, T, 8)
        h = torch.tanh(self.conv(h.transpose(1, 2))).transpose(1, 2)
        h = self.norm(h)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = torch.tanh(self.fc(self.custom(h)))
        return self.head(h.mean(1))


def _mixed_batch(batch: int = 4) -> tuple[nn.Module, Tensor, Tensor]:
    _setup()
    model = _Mixed().double()
    idx = torch.randint(0, 7, (batch, 6))
    y = torch.randint(0, 3, (batch,))
    return model, idx, y


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_rule_together(reduction: str) -> None:
    model, idx, y = _mixed_batch()
    assert_matches_oracle(model, idx, y, _cross_entropy, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("scale", ["constant", "callable"])
def test_loss_scale_gives_unscaled_statistics(reduction: str, scale: str) -> None:
    model, idx, y = _mixed_batch()
    loss_scale = 1024.0 if scale == "constant" else (lambda: 1024.0)
    scaled = run_probe(
        model,
        idx,
        y,
        _cross_entropy,
        reduction,
        loss_multiplier=1024.0,
        loss_scale=loss_scale,
        sum_grad_squared=True,
    )
    plain = run_probe(model, idx, y, _cross_entropy, reduction, sum_grad_squared=True)
    assert scaled.names == plain.names
    for field in ("dot", "sq_norm", "sum_sq", "grad_sum"):
        for name, value in getattr(plain, field).items():
            torch.testing.assert_close(getattr(scaled, field)[name], value, rtol=1e-6, atol=0)
    torch.testing.assert_close(scaled.alignment(), plain.alignment(), rtol=1e-6, atol=0)
    # (plain itself is checked against the oracle in test_every_rule_together.)


def test_non_power_of_two_loss_scale() -> None:
    model, idx, y = _mixed_batch()
    assert_matches_oracle(
        model, idx, y, _cross_entropy, "mean", loss_scale=0.37, loss_multiplier=0.37
    )


def test_loss_scale_callable_is_evaluated_per_backward() -> None:
    from lightning_gradwatch import GradientProbe

    model, idx, y = _mixed_batch()
    scales = iter([2.0, 8.0])
    current = {"scale": 1.0}

    def loss_scale() -> float:
        return current["scale"]

    probe = GradientProbe(model, loss_scale=loss_scale)
    results = []
    with probe:
        for s in scales:
            current["scale"] = s
            (_cross_entropy(model(idx), y).mean() * s).backward()
            results.append(probe.stats)
    for name in results[0].names:
        torch.testing.assert_close(
            results[0].sq_norm[name], results[1].sq_norm[name], rtol=1e-6, atol=0
        )


# --------------------------------------------------------------------------- chunking, routes
def test_tiny_chunks_give_the_same_numbers() -> None:
    model, idx, y = _mixed_batch(batch=5)
    assert_matches_oracle(model, idx, y, _cross_entropy, chunk_elements=1)
    assert_matches_oracle(model, idx, y, _cross_entropy, chunk_elements=1, sum_grad_squared=False)


@pytest.mark.parametrize("chunk_elements", [1, 7, 2**24])
@pytest.mark.parametrize(
    ("steps", "width"),
    [(8, 64), (16, 3)],
    ids=["gram", "materialise"],  # the cost model of _linalg.prefer_gram picks each route
)
def test_gram_and_materialise_routes(steps: int, width: int, chunk_elements: int) -> None:
    from lightning_gradwatch.probe import _linalg

    assert _linalg.prefer_gram(steps, width, width) == (width == 64)
    _setup()
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2)).double()
    x = torch.randn(3, steps, width, dtype=torch.float64)
    target = _target_like(model, x)
    # Without sum_sq (so the Gram route can be taken), and with it (always materialised).
    for sum_grad_squared in (False, True):
        assert_matches_oracle(
            model, x, target, chunk_elements=chunk_elements, sum_grad_squared=sum_grad_squared
        )
    # Same numbers from both routes on the same inputs.
    a = torch.randn(3, steps, 1, width, dtype=torch.float64)
    d = torch.randn(3, steps, 1, width + 1, dtype=torch.float64)
    via_gram_or_not, _, _ = _linalg.outer_product_stats(a, d, False, False, chunk_elements)
    materialised, _, _ = _linalg.outer_product_stats(a, d, False, True, chunk_elements)
    torch.testing.assert_close(via_gram_or_not, materialised, rtol=1e-12, atol=0)


class _MaskedAttention(nn.Module):
    """Cross-attention over the first ``keys`` positions with a mask."""

    def __init__(self, batch_first: bool, mask: str, keys: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.batch_first, self.mask, self.keys = batch_first, mask, keys

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, E)
        batch, steps, _ = x.shape
        kv = x[:, : self.keys]
        q, k = (x, kv) if self.batch_first else (x.transpose(0, 1), kv.transpose(0, 1))
        kwargs = {}
        if self.mask == "key_padding":  # (B, S) in both layouts
            padding = torch.zeros(batch, self.keys, dtype=torch.bool)
            padding[0, -1] = True
            kwargs["key_padding_mask"] = padding
        else:  # (T, S)
            kwargs["attn_mask"] = torch.triu(torch.ones(steps, self.keys, dtype=torch.bool), 1)
        out, _ = self.attn(q, k, k, **kwargs)
        return torch.tanh(out if self.batch_first else out.transpose(0, 1))


@pytest.mark.parametrize("keys", [3, 4])  # 3 == B: a mask dim that equals the batch size
@pytest.mark.parametrize("mask", ["key_padding", "attn"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_masked_attention_is_exact_or_excluded(batch_first: bool, mask: str, keys: int) -> None:
    """Through the public API: either exact, or left out with a warning; never a crash and
    never a silently wrong number. (batch_first=False with masks whose dims are not
    sequence-first is currently left out: the fallback guesses the sample dim per input.)"""
    _setup()
    model = _MaskedAttention(batch_first, mask, keys).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    target = _target_like(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = run_probe(model, x, target)
    if stats.excluded:
        assert not stats.names
        assert any("left out" in str(w.message) for w in caught)
        assert all("cannot be replayed" in r for r in stats.excluded.values())
    else:
        assert_matches_oracle(model, x, target)
    if batch_first:  # the layout the fallback handles: must be exact
        assert not stats.excluded


class _RootParameter(nn.Module):
    """A parameter on the root module (a ViT-style class token): the whole model is replayed."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.fc(x)], 1)
        return self.head(torch.tanh(h).mean(1))


def test_parameter_on_the_root_module() -> None:
    _setup()
    model = _RootParameter().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    assert_matches_oracle(model, x, _target_like(model, x))


@pytest.mark.parametrize(
    ("layer", "x"),
    [(nn.Linear(3, 2), torch.randn(3)), (nn.Conv1d(2, 2, 3), torch.randn(2, 5))],
    ids=["linear_1d", "conv_unbatched"],
)
def test_unbatched_input_is_excluded_with_a_warning(layer: nn.Module, x: Tensor) -> None:
    model = nn.Sequential(layer)
    with pytest.warns(UserWarning, match="no sample dimension"):
        stats = run_probe(model, x, torch.zeros(()), loss_fn=lambda out, t: out.sum().reshape(1))
    assert set(stats.excluded) == {"0.weight", "0.bias"}
    assert not stats.names


def test_batchnorm_without_running_stats_in_eval_says_why() -> None:
    _setup()
    bn = nn.BatchNorm1d(4, track_running_stats=False)
    model = nn.Sequential(nn.Linear(3, 4), bn).double().eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"in eval mode too.*track_running_stats=False"):
        stats = run_probe(model, x, torch.zeros(6, 4, dtype=torch.float64))
    assert set(stats.excluded) == {"1.weight", "1.bias"}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_instancenorm_affine_is_exact(nd: int, track: bool, training: bool) -> None:
    """Per-sample statistics (training, or no running stats) or running statistics (eval with
    them): a per-sample map either way. The probe never updates the running statistics."""
    _setup()
    norm_cls = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[nd - 1]
    norm = norm_cls(3, affine=True, track_running_stats=track)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        if track:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(norm, nn.Tanh()).double().train(training)
    x = torch.randn(4, 3, *(3,) * nd, dtype=torch.float64)
    assert_matches_oracle(model, x, _target_like(model, x))


@pytest.mark.parametrize("shape", [(0, 3), (0, 2, 3), (4, 0, 3)], ids=["B0", "B0_seq", "T0"])
def test_empty_batch_or_sequence(shape: tuple[int, ...]) -> None:
    """B = 0: statistics with ``batch_size == 0`` and no per-sample entries (no crash, no NaN).
    An empty sequence with B > 0: every per-sample gradient is exactly zero."""
    _setup()
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), _Scaled(4)).double()
    x = torch.randn(*shape, dtype=torch.float64)
    stats = run_probe(model, x, torch.zeros(*shape[:-1], 4, dtype=torch.float64))
    assert stats.batch_size == shape[0]
    assert not stats.excluded
    assert stats.is_finite()
    if shape[0] == 0:
        assert not stats.names
    else:
        assert_matches_oracle(model, x, torch.zeros(*shape[:-1], 4, dtype=torch.float64))


def _sequence_first_loss(out: Tensor, target: Tensor) -> Tensor:
    """``(B,)`` per-sample losses of ``(T, B, E)`` outputs."""
    return (out - target).pow(2).sum((0, 2))


@pytest.mark.parametrize("steps", [3, 5], ids=["T_eq_B", "T_ne_B"])
@pytest.mark.parametrize("kind", ["encoder", "transformer"])
def test_sequence_first_transformer_is_exact(kind: str, steps: int) -> None:
    """``batch_first=False``: the Linear, LayerNorm and attention submodules see ``(T, B, E)``
    and take their samples along dim 1 (also when T == B, where shapes cannot tell)."""
    _setup()
    batch = 3
    if kind == "encoder":
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False)
        encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
        model = encoder.double()
        inputs = torch.randn(steps, batch, 8, dtype=torch.float64)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # enable_nested_tensor is moot for training
            model = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0).double()
        src = torch.randn(steps, batch, 8, dtype=torch.float64)
        inputs = (src, torch.randn(4, batch, 8, dtype=torch.float64))
        model = _TupleInput(model)
    target = torch.randn(steps if kind == "encoder" else 4, batch, 8, dtype=torch.float64)
    assert_matches_oracle(model, inputs, target, loss_fn=_sequence_first_loss, batch_size=batch)


class _TupleInput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pair: tuple[Tensor, Tensor]) -> Tensor:
        return self.inner(*pair)


def test_sequence_first_without_batch_size_is_excluded_with_warnings() -> None:
    """Dim 0 of the model input (T = 5) is not the batch (3): every module is left out, each
    with a warning naming it and its shape, until ``batch_size`` is given."""
    _setup()
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False).double()
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = run_probe(layer, x, torch.zeros_like(x), loss_fn=_sequence_first_loss)
    assert not stats.names
    messages = [str(w.message) for w in caught if "left out" in str(w.message)]
    assert len(messages) == 5  # self_attn, linear1, linear2, norm1, norm2
    assert any(
        "Linear 'linear1'" in m and "3 samples but the batch has 5" in m and "(5, 3, 8)" in m
        for m in messages
    )


class _TransposingUser(nn.Module):
    """User code that runs its layers sequence-first internally."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, 4) -> (B, T, 2)
        return self.body(x.transpose(0, 1)).transpose(0, 1)


@pytest.mark.parametrize("steps", [3, 5], ids=["T_eq_B", "T_ne_B"])
def test_declared_batch_dims_for_user_code_that_transposes(steps: int) -> None:
    _setup()
    model = _TransposingUser().double()
    x = torch.randn(3, steps, 4, dtype=torch.float64)
    assert_matches_oracle(model, x, _target_like(model, x), batch_dims={"body": 1})


def test_conv_with_a_declared_non_zero_batch_dim_is_refused() -> None:
    model = nn.Sequential(nn.Conv1d(2, 2, 1))
    x = torch.randn(3, 2, 4)
    with pytest.warns(UserWarning, match="sees samples along dim 1.*needs them along dim 0"):
        stats = run_probe(model, x, torch.zeros(3, 2, 4), batch_dims={"0": 1})
    assert set(stats.excluded) == {"0.weight", "0.bias"}


def test_bad_batch_dims_and_batch_size_are_refused() -> None:
    from lightning_gradwatch import GradientProbe

    with pytest.raises(ValueError, match=r"module names as listed by model\.named_modules"):
        GradientProbe(nn.Linear(2, 2), batch_dims={"nope": 1})
    with pytest.raises(ValueError, match="batch_size must be a non-negative int"):
        GradientProbe(nn.Linear(2, 2), batch_size=-1)


class _HeadMaskedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)

    def forward(self, x: Tensor) -> Tensor:
        batch, steps, _ = x.shape
        mask = torch.zeros(batch * 2, steps, steps, dtype=torch.bool)
        mask[0, 0, 1] = True
        return self.attn(x, x, x, attn_mask=mask)[0]


def test_attention_replay_refuses_a_per_head_mask() -> None:
    _setup()
    model = _HeadMaskedAttention().double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"3-D attn_mask \(6, 4, 4\) interleaves samples"):
        stats = run_probe(model, x, torch.zeros_like(x))
    assert not stats.names


@pytest.mark.parametrize("steps", [3, 5], ids=["T_eq_B", "T_ne_B"])
def test_sample_dim_of_user_code_that_transposes_is_detected(steps: int) -> None:
    """Without ``batch_dims``: the verification forward finds that ``body``'s modules hold the
    samples along dim 1 (also when T == B, where the shapes agree either way)."""
    _setup()
    model = _TransposingUser().double()
    x = torch.randn(3, steps, 4, dtype=torch.float64)
    assert_matches_oracle(model, x, _target_like(model, x))


class _TransposedTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, idx: Tensor) -> Tensor:  # (B, T) token ids
        return self.fc(torch.tanh(self.emb(idx.T))).transpose(0, 1)


def test_sample_dim_detection_with_token_ids() -> None:
    _setup()
    model = _TransposedTokens().double()
    idx = torch.randint(0, 7, (3, 3))
    assert_matches_oracle(model, idx, _target_like(model, idx))


class _TransposedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 2, 1)
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, L) with C == B: a conv on (C, B, L)
        return self.conv(self.fc(x.transpose(1, 2)).transpose(1, 2).transpose(0, 1))


def test_detected_sample_dim_that_a_conv_cannot_take_is_refused() -> None:
    _setup()
    model = _TransposedConv().double()
    x = torch.randn(3, 3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"'conv' .*sees samples along dim 1"):
        stats = run_probe(model, x, torch.zeros(3, 2, 4, dtype=torch.float64))
    assert set(stats.excluded) == {"conv.weight", "conv.bias"}


class _SelfAttentionStack(nn.Module):
    """A transformer encoder layer (self-attention: one tensor as query, key and value) with a
    linear head, optionally under a causal float mask."""

    def __init__(self, masked: bool) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.masked = masked

    def forward(self, x: Tensor) -> Tensor:
        mask = None
        if self.masked:
            steps = x.shape[1]
            mask = torch.triu(torch.full((steps, steps), float("-inf"), dtype=x.dtype), 1)
        return self.head(self.layer(x, src_mask=mask))


@pytest.mark.parametrize("route", ["gram", "materialise"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "causal"])
def test_self_attention_routes_match_oracle(
    route: str, masked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both norm routes (forced, whatever the cost model prefers) on every T > 1 product of a
    self-attention layer: the fused 3E-output in_proj, out_proj and the feed-forward Linears;
    the attention replay with SDPA directly (unmasked) and through the functional form
    (masked). dot+norm alone (where the Gram route applies) and with sum_sq."""
    from lightning_gradwatch.probe import _linalg

    monkeypatch.setattr(_linalg, "prefer_gram", lambda *shape: route == "gram")
    _setup()
    model = _SelfAttentionStack(masked).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    target = torch.randn(3, 5, 3, dtype=torch.float64)
    for sum_grad_squared in (False, True):
        stats = assert_matches_oracle(model, x, target, sum_grad_squared=sum_grad_squared)
        assert not stats.excluded
        assert "layer.self_attn.in_proj_weight" in stats.sq_norm


def test_prefer_gram_cost_model() -> None:
    """Long sequences with wide layers favour the Gram form; short sequences or narrow layers
    favour materialising (its product is cheap and the Gram products run slowly)."""
    from lightning_gradwatch.probe._linalg import prefer_gram

    assert prefer_gram(64, 128, 512)  # a transformer feed-forward layer
    assert prefer_gram(64, 128, 384)  # self-attention's fused in_proj
    assert not prefer_gram(20, 96, 32)  # a 1-D convolution's unfolded patches
    assert not prefer_gram(40, 5, 32)
    assert not prefer_gram(16, 3, 3)
