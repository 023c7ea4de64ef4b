"""Parametrized weights (``torch.nn.utils.parametrize`` and the legacy weight/spectral-norm
hooks): per-sample statistics of the trainable sources against the float64 per-sample oracle,
training left bitwise unchanged, and the refusals.

Spectral norm updates its power-iteration vectors at every training-mode forward, so a second
forward (the oracle's) would differ from the probed one: the oracle runs from the state the
probed forward started from, and the test checks that both forwards left the same state.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import RTOL, assert_alignment_close, assert_close, run_probe, squared_error
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import expected_stats, per_sample_grads
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import (
    GradientProbe,
    GradientSNR,
    GradientWeightAlignment,
    IndexedDataset,
    SpectralNorms,
)
from lightning_gradwatch.probe.probe import ParameterUseError


class Symmetric(nn.Module):
    """A user-defined parametrization: the symmetric part of the last two dims."""

    def forward(self, x: Tensor) -> Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


class LearnedScale(nn.Module):
    """A parametrization with a trainable parameter of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x / x.norm()


class Noisy(nn.Module):
    """A parametrization that draws random numbers: cannot be replayed."""

    def forward(self, x: Tensor) -> Tensor:
        return x + 1e-3 * torch.randn_like(x)


def legacy_weight_norm(layer: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrize
        return torch.nn.utils.weight_norm(layer)


PARAMETRIZE: dict[str, Callable[[nn.Module], nn.Module]] = {
    "weight_norm": weight_norm,
    "weight_norm_dim_none": lambda m: weight_norm(m, dim=None),
    "spectral_norm": spectral_norm,
    "orthogonal": orthogonal,
    "symmetric": lambda m: parametrize.register_parametrization(m, "weight", Symmetric()),
    "learned_scale": lambda m: parametrize.register_parametrization(m, "weight", LearnedScale()),
    "legacy_weight_norm": legacy_weight_norm,
    "legacy_spectral_norm": torch.nn.utils.spectral_norm,
}


def linear_model(kind: str, width: int = 5) -> tuple[nn.Module, Tensor, Tensor]:
    """Two Linear layers, the second (square) parametrized."""
    model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width)).double()
    PARAMETRIZE[kind](model[2])
    x = torch.randn(6, 3, dtype=torch.float64)
    return model, x, torch.randn(6, width, dtype=torch.float64)


def conv_model(kind: str) -> tuple[nn.Module, Tensor, Tensor]:
    """A parametrized Conv2d (3x3 kernels, so the symmetric/orthogonal maps apply) in front of
    a plain Linear."""
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    PARAMETRIZE[kind](conv)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2).double())
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    return model, x, torch.randn(5, 2, dtype=torch.float64)


def assert_parametrized_matches_oracle(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    reduction: str,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = squared_error,
    **probe_kwargs: object,
) -> None:
    """Every statistic of every trainable parameter against the per-sample loop, the oracle's
    forward starting from the state the probed forward started from."""
    before = copy.deepcopy(model.state_dict())
    stats = run_probe(model, inputs, targets, loss_fn, reduction, sum_grad_squared=True)
    after = copy.deepcopy(model.state_dict())
    model.load_state_dict(before)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(stats.names) == sorted(names), (stats.names, stats.excluded)
    grads = per_sample_grads(model, loss_fn, inputs, targets, names)
    model.zero_grad(set_to_none=True)
    for key, value in model.state_dict().items():  # the oracle saw the probed function
        assert torch.equal(value, after[key]), key
    params = dict(model.named_parameters())
    # Flattened per sample here, as weight_norm(dim=None) has a 0-d magnitude.
    flat = {n: g.reshape(g.shape[0], -1) for n, g in grads.items()}
    dot = {n: flat[n] @ params[n].detach().reshape(-1) for n in names}
    sq = {n: flat[n].pow(2).sum(1) for n in names}
    sum_sq = {n: grads[n].pow(2).sum(0) for n in names}
    for n in names:
        assert_close(stats.dot[n], dot[n], f"dot[{n}]")
        assert_close(stats.sq_norm[n], sq[n], f"sq_norm[{n}]")
        assert_close(stats.sum_sq[n], sum_sq[n], f"sum_sq[{n}]")
        assert_close(stats.grad_sum[n], grads[n].sum(0), f"grad_sum[{n}]")
        assert_alignment_close(stats, [n], dot, sq, params)
    assert_alignment_close(stats, names, dot, sq, params)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", list(PARAMETRIZE))
def test_linear_matches_oracle(kind: str, reduction: str) -> None:
    torch.manual_seed(0)
    model, x, y = linear_model(kind)
    assert_parametrized_matches_oracle(model, x, y, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", list(PARAMETRIZE))
def test_conv2d_matches_oracle(kind: str, reduction: str) -> None:
    torch.manual_seed(1)
    model, x, y = conv_model(kind)
    assert_parametrized_matches_oracle(model, x, y, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_embedding_and_bias_parametrizations_match_oracle(reduction: str) -> None:
    torch.manual_seed(2)
    # dim=1: norms over the vocabulary (the padding row is zero, its own norm would be 0).
    embedding = weight_norm(nn.Embedding(7, 4, padding_idx=0).double(), dim=1)
    head = nn.Linear(4, 3).double()
    parametrize.register_parametrization(head, "bias", nn.Tanh())  # a parametrized bias
    model = nn.Sequential(embedding, nn.Flatten(), nn.Linear(12, 4).double(), head)
    ids = torch.randint(0, 7, (6, 3))
    targets = torch.randn(6, 3, dtype=torch.float64)
    assert_parametrized_matches_oracle(model, ids, targets, reduction)


@pytest.mark.parametrize("kind", ["spectral_norm", "legacy_spectral_norm", "weight_norm"])
def test_layer_called_twice_per_forward(kind: str) -> None:
    """Spectral norm runs a power-iteration step at each call, so the two calls use different
    effective weights: each call is pulled back through its own."""
    torch.manual_seed(3)
    layer = PARAMETRIZE[kind](nn.Linear(4, 4).double())

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: Tensor) -> Tensor:
            return self.layer(torch.tanh(self.layer(x)))

    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    assert_parametrized_matches_oracle(Twice(), x, y, "mean")


@settings(max_examples=8, deadline=None)
@given(
    batch=st.integers(1, 6),
    fan_in=st.integers(1, 5),
    fan_out=st.integers(1, 5),
    kind=st.sampled_from(["weight_norm", "spectral_norm", "orthogonal"]),
    seed=st.integers(0, 2**16),
)
def test_linear_shapes_match_oracle(
    batch: int, fan_in: int, fan_out: int, kind: str, seed: int
) -> None:
    torch.manual_seed(seed)
    layer = PARAMETRIZE[kind](nn.Linear(fan_in, fan_out).double())
    model = nn.Sequential(layer, nn.Tanh())
    x = torch.randn(batch, fan_in, dtype=torch.float64)
    y = torch.randn(batch, fan_out, dtype=torch.float64)
    assert_parametrized_matches_oracle(model, x, y, "sum")


def test_parametrization_list_is_never_taken_for_a_batch() -> None:
    """The effective weight has as many rows as the batch: before, the ParametrizationList was
    probed as a module whose output rows were samples (GSNR 98% off)."""
    torch.manual_seed(4)
    batch = 6
    model = nn.Sequential(spectral_norm(nn.Linear(3, batch)), nn.Tanh()).double()
    x, y = torch.randn(batch, 3, dtype=torch.float64), torch.randn(batch, batch).double()
    assert_parametrized_matches_oracle(model, x, y, "mean")
    probe = GradientProbe(model)
    assert [o.module_name for o in probe._owners] == ["0"]


def test_float32_matches_a_float32_oracle() -> None:
    """A float32 model: the probe and the oracle both round in float32; their results agree
    to a few float32 ulps of the accumulated sums (rtol 1e-4, far above eps32 * width)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), spectral_norm(nn.Linear(8, 4)))
    x, y = torch.randn(6, 3), torch.randn(6, 4)
    before = copy.deepcopy(model.state_dict())
    stats = run_probe(model, x, y)
    model.load_state_dict(before)
    name = "2.parametrizations.weight.original"
    grads = per_sample_grads(model, squared_error, x, y, [name])
    dot, sq, _ = expected_stats(model, grads)
    assert_close(stats.sq_norm[name], sq[name].to(stats.dot[name].dtype), "sq", rtol=1e-4)
    # Spectral norm is scale invariant, so <g_i, W> = 0 in exact arithmetic: both sides are
    # float32 rounding noise, bounded relative to |g_i| |W|.
    bound = 1e-5 * (sq[name] * model[2].parametrizations.weight.original.pow(2).sum()).sqrt()
    assert (stats.dot[name].double() - dot[name]).abs().le(bound.detach()).all()
    assert dot[name].abs().le(bound.detach()).all()


def effective_grads(
    model: nn.Module, layer: nn.Module, inputs: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-sample gradients ``(B, *W.shape)`` of the effective weight the forward used (the
    cached parametrization, or the legacy hook's attribute), one backward per sample; and
    that weight."""
    with parametrize.cached():
        losses = squared_error(model(inputs), targets)
        weight = layer.weight
        grads = [
            torch.autograd.grad(losses[i], weight, retain_graph=True)[0]
            for i in range(losses.shape[0])
        ]
    return torch.stack(grads), weight.detach()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", list(PARAMETRIZE))
def test_effective_weight_matches_oracle(kind: str, reduction: str) -> None:
    """Tracking ``"2.weight"`` itself: ``g_i`` is the gradient with respect to the effective
    weight, and ``theta`` is the effective weight."""
    torch.manual_seed(9)
    model, x, y = linear_model(kind)
    before = copy.deepcopy(model.state_dict())
    stats = run_probe(model, x, y, reduction=reduction, params=["2.weight", "0.weight"])
    model.load_state_dict(before)
    grads, weight = effective_grads(model, model[2], x, y)
    flat = grads.flatten(1)
    assert_close(stats.dot["2.weight"], flat @ weight.reshape(-1), "dot")
    assert_close(stats.sq_norm["2.weight"], flat.pow(2).sum(1), "sq_norm")
    assert_close(stats.param_sq_norm["2.weight"], weight.pow(2).sum(), "|W|^2")


def test_effective_weight_refusals() -> None:
    model, _, _ = linear_model("spectral_norm")
    with pytest.raises(ValueError, match=r"sum_grad_squared=True .* reparametrized \['2.weight'\]"):
        GradientProbe(model, params=["2.weight"], sum_grad_squared=True)
    layer = spectral_norm(nn.Linear(4, 4).double())

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: Tensor) -> Tensor:
            return self.layer(self.layer(x))

    with pytest.warns(UserWarning, match="ran 2 times in one forward") as record:
        stats = run_probe(
            Twice(), torch.randn(3, 4).double(), torch.randn(3, 4).double(), params=["layer.weight"]
        )
    message = str(record[0].message)
    assert "ParametrizedLinear 'layer'" in message
    assert "track the sources instead (['parametrizations.weight.original'])" in message
    assert "layer.weight" in stats.excluded


# ---------------------------------------------------------------------- training unchanged
def _train(model: nn.Module, probed: bool, steps: int = 4) -> dict[str, Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        probe = GradientProbe(model, sum_grad_squared=True)
        with probe if probed else _nothing():
            F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _parametrized_mlp() -> nn.Module:
    torch.manual_seed(6)
    return nn.Sequential(
        spectral_norm(nn.Linear(4, 8)),
        nn.ReLU(),
        weight_norm(nn.Linear(8, 8)),
        nn.Dropout(0.2),
        torch.nn.utils.spectral_norm(nn.Linear(8, 8)),
        nn.ReLU(),
        legacy_weight_norm(nn.Linear(8, 3)),
    )


def test_probe_leaves_training_bitwise_unchanged() -> None:
    """Parameters and buffers (spectral norm's ``_u``/``_v``), and the random stream (the
    dropout masks), are identical with and without the probe."""
    plain = _train(_parametrized_mlp(), probed=False)
    torch.manual_seed(0)
    probed = _train(_parametrized_mlp(), probed=True)
    assert plain.keys() == probed.keys()
    for key, value in plain.items():
        assert torch.equal(value, probed[key]), key


class ParametrizedClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = spectral_norm(nn.Linear(6, 16))
        self.mid = weight_norm(nn.Linear(16, 16))
        self.head = spectral_norm(nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.mid(F.relu(self.body(x)))))

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, _ = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callbacks: list[pl.Callback]) -> ParametrizedClassifier:
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=8)
    model = ParametrizedClassifier()
    trainer = pl.Trainer(
        callbacks=callbacks,
        default_root_dir=tmp_path,
        max_epochs=2,
        log_every_n_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    return model


@pytest.mark.slow
def test_callbacks_leave_training_bitwise_unchanged(tmp_path) -> None:
    gwa = GradientWeightAlignment(indices=-1)  # the head: its effective weight
    snr = GradientSNR(every_n_steps=1)
    spectral = SpectralNorms(grad_every_n_steps=1)
    plain = _fit(tmp_path / "plain", [])
    watched = _fit(tmp_path / "watched", [gwa, snr, spectral])
    reference = plain.state_dict()
    for key, value in watched.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert len(gwa.history) == 2 and all(h["count"] == 32 for h in gwa.history)
    # The effective weight is tracked under the module's attribute name; spectral norm keeps
    # it near sigma_max = 1.
    assert spectral.tracked_names == ["body.weight", "mid.weight", "head.weight"]
    head = spectral.last_values["spectral_layers/sigma_max/head.weight"]
    assert head == pytest.approx(1.0, abs=0.05)
    assert not any("grad_sigma_max" in k and "head" in k for k in spectral.last_values)


# ---------------------------------------------------------------------- refusals and messages
def test_random_parametrization_is_refused_without_consuming_randomness() -> None:
    torch.manual_seed(7)
    layer = nn.Linear(3, 3).double()
    parametrize.register_parametrization(layer, "weight", Noisy())
    model = nn.Sequential(nn.Linear(2, 3).double(), layer)
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    probe = GradientProbe(model)
    with pytest.warns(UserWarning) as record, probe:
        loss = squared_error(model(x), y).mean()
        state = torch.get_rng_state()
        loss.backward()
        assert torch.equal(torch.get_rng_state(), state)
    message = " ".join(str(w.message) for w in record)
    assert "'1' is left out" in message
    assert "parametrizations.weight (Noisy)" in message
    assert "draws random numbers" in message and "aten.randn" in message
    assert "make the parametrization deterministic" in message
    assert "1.parametrizations.weight.original" in probe.stats.excluded
    assert "0.weight" in probe.stats.names


def test_parametrized_layer_without_a_dedicated_rule_is_refused() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3, 3, dtype=torch.float64))

        def forward(self, x: Tensor) -> Tensor:
            return x @ self.weight

    scale = weight_norm(Scale())
    model = nn.Sequential(nn.Linear(2, 3).double(), scale)
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="not inside a Scale") as record:
        stats = run_probe(model, x, torch.randn(4, 3, dtype=torch.float64))
    message = str(record[0].message)
    assert "ParametrizedScale '1'" in message
    assert "'weight' by parametrizations.weight (_WeightNorm)" in message
    assert "leave its parameters out of params" in message
    assert "1.parametrizations.weight.original0" in stats.excluded


def test_reparametrized_child_of_a_recursive_rule_is_refused() -> None:
    """nn.MultiheadAttention's rule owns its out_proj: it would read a spectral-normed
    out_proj's weight as a plain one (zeros for the source, a power-iteration step)."""
    torch.manual_seed(11)
    attention = nn.MultiheadAttention(4, 2, batch_first=True).double()
    spectral_norm(attention.out_proj)
    u = attention.out_proj.parametrizations.weight[0]._u
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    readout = nn.Linear(4, 1).double()
    model = nn.ModuleDict({"attention": attention, "readout": readout})
    with pytest.warns(UserWarning, match="not inside a MultiheadAttention") as record:
        probe = GradientProbe(model)
        with probe:
            loss = readout(attention(x, x, x)[0]).pow(2).sum()
            version = u._version  # after the forward's own power-iteration step
            loss.backward()
    assert u._version == version
    assert "'out_proj.weight' by parametrizations.weight (_SpectralNorm)" in str(record[0].message)
    assert probe.stats.names == ["readout.weight", "readout.bias"]
    assert "attention.out_proj.parametrizations.weight.original" in probe.stats.excluded


class TinyModule(pl.LightningModule):
    def __init__(self, head: nn.Module, body: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body if body is not None else nn.Identity()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_tiny(tmp_path, model: pl.LightningModule, callback: pl.Callback) -> None:
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    trainer = pl.Trainer(
        callbacks=[callback],
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(data, batch_size=8))


def test_gwa_head_mode_scores_the_effective_weight(tmp_path) -> None:
    """The parametrized head is found and scored on its effective weight; finding it read no
    weight, so it ran no power-iteration step at setup."""
    model = TinyModule(spectral_norm(nn.Linear(4, 3)), body=nn.Linear(4, 4))
    candidates = GradientWeightAlignment(indices=None).probe_params(None, model)  # type: ignore[arg-type]
    assert candidates == ["body.weight", "head.weight"]
    gwa = GradientWeightAlignment(indices=None)
    _fit_tiny(tmp_path, model, gwa)
    assert gwa.head_name == "head.weight"
    assert gwa.probe is not None and gwa.probe.param_names == ["head.weight"]
    assert gwa.history and gwa.history[0]["count"] == 16


def test_gwa_accepts_a_reparametrized_weight_by_name(tmp_path) -> None:
    gwa = GradientWeightAlignment(params=["head.weight"], indices=None)
    _fit_tiny(tmp_path, TinyModule(legacy_weight_norm(nn.Linear(4, 3))), gwa)
    assert gwa.history and gwa.history[0]["count"] == 16


def test_spectral_norms_tracks_the_effective_weight_without_side_effects() -> None:
    """The effective weight's norm, read without a power-iteration step: the module's
    vectors are untouched."""
    torch.manual_seed(8)
    model = nn.Sequential(spectral_norm(nn.Linear(5, 4)), nn.ReLU(), weight_norm(nn.Linear(4, 2)))
    model(torch.randn(3, 5))  # one training forward: the vectors of the latest forward
    callback = SpectralNorms()
    tracked = callback._select(model)  # type: ignore[arg-type]
    assert [t.name for t in tracked] == ["0.weight", "2.weight"]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    for t in tracked:
        module = model.get_submodule(t.name.rpartition(".")[0])
        with parametrize.cached(), torch.no_grad():
            model.eval()  # reading the attribute in eval mode runs no power iteration
            expected = module.weight.clone()
            model.train()
        assert_close(t.weight().double(), expected.double(), t.name, rtol=RTOL)
    for key, value in model.named_buffers():
        assert torch.equal(value, buffers[key]), key


def test_gwa_all_mode_scores_effective_weights(tmp_path) -> None:
    """In "all" mode a reparametrized weight replaces its sources (scoring spectral norm's
    source would give a cosine that is identically 0: the map is scale invariant)."""
    model = TinyModule(spectral_norm(nn.Linear(4, 3)), body=weight_norm(nn.Linear(4, 4)))
    gwa = GradientWeightAlignment(params="all", indices=None)
    assert gwa.probe_params(None, model) == ["body.weight", "head.weight"]  # type: ignore[arg-type]
    _fit_tiny(tmp_path, model, gwa)
    assert set(gwa.layer_history) == {"body.weight", "head.weight"}
    assert all(math.isfinite(v) for values in gwa.layer_history.values() for v in values)


def test_reading_the_weight_outside_the_layer_is_reported_as_such() -> None:
    """Evaluating a parametrization pushes its own modules: a weight penalty is a use outside
    every module's forward, and a parent reading ``fc.weight`` is a use by the parent; neither
    is blamed on the parametrization."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), spectral_norm(nn.Linear(4, 2)))
    x = torch.randn(5, 3)
    outside = r"'1.parametrizations.weight.original' is used outside"
    with pytest.warns(UserWarning, match=outside), GradientProbe(model):
        (model(x).pow(2).sum() + model[1].weight.pow(2).sum()).backward()

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = spectral_norm(nn.Linear(3, 2))

        def forward(self, x: Tensor) -> Tensor:
            return F.linear(x, self.fc.weight)

    parent = Parent()
    used_by_parent = r"inside the forward of module '' \(Parent\)"
    with pytest.raises(ParameterUseError, match=used_by_parent), GradientProbe(parent):
        parent(x).sum().backward()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_frozen_magnitude_of_weight_norm(reduction: str) -> None:
    """weight_norm with its magnitude g frozen: v alone is tracked, through the same chain."""
    torch.manual_seed(12)
    model, x, y = linear_model("weight_norm")
    model[2].parametrizations.weight.original0.requires_grad_(False)
    assert_parametrized_matches_oracle(model, x, y, reduction)
