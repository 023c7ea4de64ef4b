"""GradientSNR: every logged quantity against brute-force float64 per-sample gradients.

Tolerances: rtol=1e-6 against the oracle (float64 models), rtol=1e-12 for identities between
the pure functions and direct formulas on the same float64 per-sample gradients.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import EBEarlyStopping, GradientSNR
from lightning_gradwatch.callbacks.gradient_snr import optimizer_steps_done
from lightning_gradwatch.functional import noise as fn
from lightning_gradwatch.metrics.noise import GradientNoiseSums, RatioEMA

sys.path.insert(0, str(Path(__file__).parent))
from ddp_scripts import DDP_TEARDOWN
from oracle import per_sample_grads

RTOL = 1e-6


# ----------------------------------------------------------------------------- the oracle
def expected_quantities(
    grads: dict[str, Tensor], eps: float = 0.0, rtol_zero: float | None = None
) -> dict[str, float]:
    """Every logged quantity straight from materialised per-sample gradients ``(B, ...)``.

    Written from the definitions (torch.var over samples, explicit deviations from the mean),
    not from the sums the callback uses.
    """
    names = list(grads)
    flat = {n: g.flatten(1).double() for n, g in grads.items()}
    every = torch.cat([flat[n] for n in names], 1)
    batch = every.shape[0]
    rtol_zero = 64 * torch.finfo(torch.float64).eps if rtol_zero is None else rtol_zero

    def gsnr(g: Tensor) -> float:
        mean, var = g.mean(0), g.var(0, unbiased=False)
        if eps > 0:
            return float((mean**2 / (var + eps)).mean())
        keep = var > rtol_zero * g.pow(2).mean(0)
        return float((mean[keep] ** 2 / var[keep]).mean()) if keep.any() else math.nan

    def coherence(g: Tensor) -> float:
        return float(g.sum(0).pow(2).sum() / (batch * g.pow(2).sum()))

    mean = every.mean(0)
    trace = float((every - mean).pow(2).sum() / (batch - 1))
    true_sq = float(mean.pow(2).sum()) - trace / batch
    s2 = every.var(0, unbiased=True)
    if eps > 0:
        eb = 1 - batch * float((mean**2 / (s2 + eps)).mean())
    else:
        keep = every.var(0, unbiased=False) > rtol_zero * every.pow(2).mean(0)
        eb = 1 - batch * float((mean[keep] ** 2 / s2[keep]).mean())
    out = {
        "gsnr/mean": gsnr(every),
        "noise_scale/simple": trace / true_sq,
        "noise_scale/trace_sigma": trace,
        "noise_scale/grad_sq_norm": true_sq,
        "gsnr/coherence": coherence(every),
        "eb/criterion": eb,
        "gradwatch/batch_size": float(batch),
    }
    for n in names:
        out[f"gsnr_layers/gsnr/{n}"] = gsnr(flat[n])
        out[f"gsnr_layers/coherence/{n}"] = coherence(flat[n])
    return out


def assert_close(actual: dict[str, Any], expected: dict[str, float], rtol: float = RTOL) -> None:
    for key, want in expected.items():
        if math.isnan(want):
            assert key not in actual or math.isnan(float(actual[key])), key
            continue
        assert key in actual, f"{key} not logged; got {sorted(actual)}"
        got = float(actual[key])
        assert math.isclose(got, want, rel_tol=rtol, abs_tol=0.0), f"{key}: {got} vs {want}"


# ----------------------------------------------------------------------------- models
class SeqModel(nn.Module):
    """Embedding -> per-position Linear (T > 1) -> LayerNorm -> mean pool -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(torch.tanh(self.mix(self.embed(x)))).mean(1))


def make_model(kind: str) -> tuple[nn.Module, Tensor]:
    """A float64 model and 16 inputs for it."""
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        model: nn.Module = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        inputs = torch.randn(16, 6, generator=g)
    elif kind == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5 * 5, 3)
        )
        inputs = torch.randn(16, 1, 5, 5, generator=g)
    else:
        model = SeqModel()
        inputs = torch.randint(0, 11, (16, 4), generator=g)
    torch.manual_seed(1)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    return model.double(), inputs if kind == "seq" else inputs.double()


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.1, poison_batch: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.poison_batch = poison_batch

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if batch_idx == self.poison_batch:
            loss = loss * float("inf")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def per_sample_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


class Recorder(pl.Callback):
    """Records each optimizer step's batches, the parameters it used and GradientSNR's values."""

    def __init__(self, gsnr: GradientSNR) -> None:
        self.gsnr = gsnr
        self.batches: dict[int, list[Any]] = {}
        self.steps: list[tuple[list[Any], dict[str, Tensor], dict[str, float]]] = []
        self.backwards = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.gsnr.probe is not None
        self.gsnr.probe.add_listener(self._count)

    def _count(self, stats: Any) -> None:
        self.backwards += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.batches.setdefault(optimizer_steps_done(trainer), []).append(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        step = optimizer_steps_done(trainer)
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        values = (
            {k: float(v) for k, v in self.gsnr.latest.items()}
            if self.gsnr.latest_step == step
            else {}
        )
        self.steps.append((self.batches.pop(step), params, values))


def fit(
    kind: str,
    gsnr: GradientSNR,
    *,
    batch_size: int = 4,
    accumulate: int = 1,
    max_steps: int = 2,
    log_every_n_steps: int = 1,
    extra: list[pl.Callback] | None = None,
    poison_batch: int | None = None,
    n_samples: int = 16,
) -> tuple[Module, Recorder, pl.Trainer]:
    net, inputs = make_model(kind)
    inputs = inputs[:n_samples]
    targets = torch.arange(len(inputs)) % 3
    module = Module(net, poison_batch=poison_batch)
    recorder = Recorder(gsnr)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=batch_size, shuffle=False)
    trainer = pl.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=log_every_n_steps,
        callbacks=[gsnr, recorder, *(extra or [])],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no logger.*")
        trainer.fit(module, loader)
    return module, recorder, trainer


def oracle_for_step(
    module: Module, batches: list[Any], params: dict[str, Tensor], **kw: Any
) -> dict[str, float]:
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(params[n])
    names = [n for n, _ in module.named_parameters()]
    grads = per_sample_grads(module, per_sample_loss, inputs, targets, names)
    return expected_quantities(grads, **kw)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_every_quantity_matches_oracle(kind: str, accumulate: int) -> None:
    gsnr = GradientSNR(every_n_steps=1)
    module, recorder, _ = fit(kind, gsnr, accumulate=accumulate, max_steps=2)
    assert len(recorder.steps) == 2
    for batches, params, values in recorder.steps:
        assert len(batches) == accumulate
        expected = oracle_for_step(module, batches, params)
        assert values["gradwatch/batch_size"] == 4 * accumulate
        assert_close(values, expected)
    # The smoothed noise scale is the ratio of EMAs of the logged numerator and denominator.
    (_, _, first), (_, _, second) = recorder.steps
    num = 0.9 * first["noise_scale/trace_sigma"] + 0.1 * second["noise_scale/trace_sigma"]
    den = 0.9 * first["noise_scale/grad_sq_norm"] + 0.1 * second["noise_scale/grad_sq_norm"]
    assert first["noise_scale/smoothed"] == pytest.approx(first["noise_scale/simple"], rel=1e-12)
    assert second["noise_scale/smoothed"] == pytest.approx(num / den, rel=1e-12)


def test_cockpit_mean_gsnr_formula() -> None:
    """``gsnr/mean`` equals Cockpit's ``g**2 / (B*SGS - g**2 + eps)`` with BackPACK's
    1/B-scaled individual gradients, for Cockpit's eps and (no zero-variance entries here)
    for eps = 0."""
    for eps in (1e-5, 0.0):
        gsnr = GradientSNR(every_n_steps=1, eps=eps)
        module, recorder, _ = fit("mlp", gsnr, batch_size=8, max_steps=1)
        (batches, params, values) = recorder.steps[0]
        oracle_for_step(module, batches, params)  # loads the step's parameters
        x, y = batches[0]
        names = [n for n, _ in module.named_parameters()]
        grads = per_sample_grads(module, per_sample_loss, x, y, names)
        batch = x.shape[0]
        individual = torch.cat([grads[n].flatten(1) for n in names], 1) / batch
        grad = individual.sum(0)
        sum_grad_squared = individual.pow(2).sum(0)
        cockpit = (grad**2 / (batch * sum_grad_squared - grad**2 + eps)).mean()
        assert values["gsnr/mean"] == pytest.approx(float(cockpit), rel=RTOL)


# ----------------------------------------------------------------------------- functional
@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    batch=st.integers(2, 9),
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    dead=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_functional_from_sums_matches_definitions(
    batch: int, sizes: list[int], dead: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    grads = {
        f"p{k}": torch.randn(batch, s, generator=gen, dtype=torch.float64)
        for k, s in enumerate(sizes)
    }
    dead = dead and sum(sizes) > 1  # keep one live entry so every quantity is defined
    if dead:  # a dead unit: zero gradient for every sample, so zero variance
        grads["p0"][:, 0] = 0.0
    every = torch.cat(list(grads.values()), 1)
    s, q, n = every.sum(0), every.pow(2).sum(0), every.pow(2).sum()
    want = expected_quantities(grads)
    got = {
        "gsnr/mean": fn.gsnr_mean(s, q, batch),
        "noise_scale/simple": fn.noise_scale(s, n, batch),
        "noise_scale/trace_sigma": fn.trace_covariance(s, n, batch),
        "noise_scale/grad_sq_norm": fn.true_grad_sq_norm(s, n, batch),
        "gsnr/coherence": fn.coherence(s, n, batch),
        "eb/criterion": fn.eb_criterion(s, q, batch),
    }
    assert_close(got, {k: want[k] for k in got}, rtol=1e-10)
    assert 0.0 <= float(got["gsnr/coherence"]) <= 1.0 + 1e-12
    per_entry = fn.gsnr_per_entry(s, q, batch)
    assert bool(torch.isnan(per_entry[0])) == dead
    # The fused routine the callback uses agrees with the single-quantity functions.
    sizes_now = [g.shape[1] for g in grads.values()]
    norms = torch.stack([g.pow(2).sum() for g in grads.values()])
    for eps in (0.0, 1e-3):
        fused = fn.noise_statistics(s, q, norms, batch, sizes_now, eps=eps)
        single = {
            "gsnr_mean": fn.gsnr_mean(s, q, batch, eps=eps),
            "eb_criterion": fn.eb_criterion(s, q, batch, eps=eps),
            "noise_scale": got["noise_scale/simple"],
            "coherence": got["gsnr/coherence"],
        }
        for key, want_value in single.items():
            torch.testing.assert_close(fused[key], want_value, rtol=1e-10, atol=1e-12)
        parts = zip(s.split(sizes_now), q.split(sizes_now), norms, strict=True)
        for k, (s_k, q_k, n_k) in enumerate(parts):
            torch.testing.assert_close(
                fused["layer_gsnr"][k],
                fn.gsnr_mean(s_k, q_k, batch, eps=eps),
                rtol=1e-10,
                atol=0.0,
                equal_nan=True,
            )
            torch.testing.assert_close(
                fused["layer_coherence"][k],
                fn.coherence(s_k, n_k, batch),
                rtol=1e-10,
                atol=0.0,
                equal_nan=True,
            )
    # EB criterion = 1 - (B - 1) * mean GSNR over the same entries (s^2 = B/(B-1) var).
    assert float(got["eb/criterion"]) == pytest.approx(
        1 - (batch - 1) * float(got["gsnr/mean"]), rel=1e-10, abs=1e-10
    )


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_noise_statistics_left_out_layers_and_workspace(eps: float) -> None:
    """``complete=`` leaves a layer out exactly as zeroing its sums does, and a reused
    ``workspace`` (stale contents from an earlier call) changes nothing."""
    gen = torch.Generator().manual_seed(3)
    sizes = [6, 4, 5]
    grads = torch.randn(7, sum(sizes), generator=gen, dtype=torch.float64)
    grads[:, 0] = 0.0  # a dead entry in a kept layer
    s, q = grads.sum(0), grads.pow(2).sum(0)
    norms = torch.stack([g.pow(2).sum() for g in grads.split(sizes, 1)])
    complete = torch.tensor([True, False, True])
    keep = torch.repeat_interleave(complete, torch.tensor(sizes))
    zeroed = fn.noise_statistics(
        torch.where(keep, s, 0.0),
        torch.where(keep, q, 0.0),
        torch.where(complete, norms, 0.0),
        7,
        sizes,
        eps=eps,
    )
    workspace: list[Tensor] = []
    fn.noise_statistics(s * 3, q * 5, norms, 7, sizes, eps=eps, workspace=workspace)
    for _ in range(2):
        masked = fn.noise_statistics(
            s, q, norms, 7, sizes, eps=eps, complete=complete, workspace=workspace
        )
        for key, want in zeroed.items():
            torch.testing.assert_close(masked[key], want, rtol=1e-12, atol=0.0, equal_nan=True)
    # eps == 0: every entry of the left-out layer is excluded, so its mean is 0/0.
    assert bool(torch.isnan(masked["layer_gsnr"][1])) == (eps == 0.0)


def test_zero_variance_entries_left_out_or_eps() -> None:
    grads = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0], [2.0, 0.0, 2.0]], dtype=torch.float64)
    s, q = grads.sum(0), grads.pow(2).sum(0)
    r = fn.gsnr_per_entry(s, q, 3)
    assert torch.isnan(r[1]) and torch.isnan(r[2])  # dead entry and all-agree entry
    assert float(fn.gsnr_mean(s, q, 3)) == pytest.approx(4.0 / (2.0 / 3.0))
    with_eps = fn.gsnr_per_entry(s, q, 3, eps=1e-5)
    assert float(with_eps[1]) == 0.0 and torch.isfinite(with_eps).all()


def test_sums_metric_accumulates_and_marks_missing_layers() -> None:
    sums = GradientNoiseSums({"a": 2, "b": 3}, dtype=torch.float64)
    g = torch.randn(5, 5, dtype=torch.float64)
    a, b = g[:, :2], g[:, 2:]
    sums.update(
        {"a": a[:3].sum(0), "b": b[:3].sum(0)},
        {"a": a[:3].pow(2).sum(0), "b": b[:3].pow(2).sum(0)},
        {"a": a[:3].pow(2).sum(1), "b": b[:3].pow(2).sum(1)},
        3,
    )
    sums.update({"a": a[3:].sum(0)}, {"a": a[3:].pow(2).sum(0)}, {"a": a[3:].pow(2).sum(1)}, 2)
    out = sums.compute()
    assert int(out.count) == 5 and out.layer_count.tolist() == [5, 3]
    torch.testing.assert_close(out.grad_sum[sums.layer_slice("a")], a.sum(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.sample_sq_norm_sum[0], a.pow(2).sum(), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- schedule
def test_default_schedule_follows_log_every_n_steps() -> None:
    gsnr = GradientSNR()
    _, recorder, _ = fit("mlp", gsnr, max_steps=7, log_every_n_steps=3, accumulate=2, n_samples=64)
    # Lightning logs when (steps done + 1) % 3 == 0: steps 2 and 5, two micro-batches each.
    assert recorder.backwards == 4
    assert [i for i, (_, _, v) in enumerate(recorder.steps) if v] == [2, 5]
    assert gsnr.probe is not None and not gsnr.probe._active


def test_every_n_steps_overrides_schedule() -> None:
    gsnr = GradientSNR(every_n_steps=2)
    _, recorder, trainer = fit("mlp", gsnr, max_steps=4, log_every_n_steps=50)
    assert recorder.backwards == 2
    assert [i for i, (_, _, v) in enumerate(recorder.steps) if v] == [1, 3]
    # Computed off Lightning's logging steps: the EMA moves, nothing is written.
    assert int(gsnr.noise_scale_ema.updates) == 2
    assert "gsnr/mean" not in trainer.callback_metrics
    # Step 3 is a logging step with log_every_n_steps=4: its values are written.
    gsnr = GradientSNR(every_n_steps=2)
    _, recorder, trainer = fit("mlp", gsnr, max_steps=4, log_every_n_steps=4)
    assert float(trainer.callback_metrics["gsnr/mean"]) == recorder.steps[3][2]["gsnr/mean"]


def test_monitoring_does_not_change_training() -> None:
    def run(callbacks: list[pl.Callback]) -> list[Tensor]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        data = TensorDataset(torch.randn(16, 6), torch.arange(16) % 3)
        trainer = pl.Trainer(
            max_steps=3,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
        )
        module = Module(net)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*has no logger.*")
            trainer.fit(module, DataLoader(data, batch_size=4))
        return [p.detach().clone() for p in module.parameters()]

    plain = run([])
    watched = run([GradientSNR(every_n_steps=1)])
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))


# ----------------------------------------------------------------------------- edge cases
def test_batch_of_one_warns_once_and_skips() -> None:
    gsnr = GradientSNR(every_n_steps=1)
    with pytest.warns(UserWarning, match="effective batch has 1 sample") as record:
        _, recorder, _ = fit("mlp", gsnr, batch_size=1, max_steps=3)
    assert sum("effective batch" in str(w.message) for w in record) == 1
    assert all(not v for _, _, v in recorder.steps) and gsnr.latest == {}
    # Accumulating two single-sample micro-batches gives B = 2: computed and exact.
    gsnr = GradientSNR(every_n_steps=1)
    module, recorder, _ = fit("mlp", gsnr, batch_size=1, accumulate=2, max_steps=1)
    batches, params, values = recorder.steps[0]
    assert_close(values, oracle_for_step(module, batches, params))


def test_non_finite_step_is_skipped_and_counted() -> None:
    gsnr = GradientSNR(every_n_steps=1)
    _, recorder, _ = fit("mlp", gsnr, max_steps=2, poison_batch=1)
    assert gsnr.skipped_steps == 1
    assert [bool(v) for _, _, v in recorder.steps] == [True, False]
    assert gsnr.latest_step == 0


def test_bad_configuration_raises() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientSNR(every_n_steps=0)
    with pytest.raises(ValueError, match="eps"):
        GradientSNR(eps=-1.0)
    with pytest.raises(ValueError, match="unknown parameter names"):
        fit("mlp", GradientSNR(params=["nope"]), max_steps=1)
    with pytest.raises(ValueError, match="needs a GradientSNR"):
        net, x = make_model("mlp")
        trainer = pl.Trainer(
            max_steps=1,
            callbacks=[EBEarlyStopping()],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
        )
        trainer.fit(Module(net), DataLoader(TensorDataset(x, torch.arange(16) % 3), batch_size=4))


# ----------------------------------------------------------------------------- state
def test_ema_state_dict_round_trip() -> None:
    values = [(torch.tensor(float(k + 1)), torch.tensor(0.5 * k + 2.0)) for k in range(6)]
    whole = RatioEMA(0.8)
    for num, den in values:
        whole.update(num, den)
    first = GradientSNR(noise_scale_decay=0.8)
    for num, den in values[:3]:
        first.noise_scale_ema.update(num, den)
    resumed = GradientSNR(noise_scale_decay=0.8)
    resumed.load_state_dict(first.state_dict())
    for num, den in values[3:]:
        resumed.noise_scale_ema.update(num, den)
    assert int(resumed.noise_scale_ema.updates) == 6
    assert float(resumed.noise_scale_ema.compute()) == float(whole.compute())
    # By hand: the first value initialises, later ones decay.
    num, den = 1.0, 2.0
    for k in range(1, 6):
        num, den = 0.8 * num + 0.2 * (k + 1), 0.8 * den + 0.2 * (0.5 * k + 2.0)
    assert float(whole.compute()) == pytest.approx(num / den, rel=1e-12)


def test_checkpoint_resume_continues_smoothing(tmp_path: Path) -> None:
    def trainer_for(epochs: int, gsnr: GradientSNR) -> pl.Trainer:
        return pl.Trainer(
            max_epochs=epochs,
            callbacks=[gsnr],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
            default_root_dir=tmp_path,
            enable_checkpointing=False,
        )

    def data() -> DataLoader:
        net_x = make_model("mlp")[1][:8]
        return DataLoader(TensorDataset(net_x, torch.arange(8) % 3), batch_size=4)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no logger.*")
        whole = GradientSNR(every_n_steps=1)
        trainer_for(2, whole).fit(Module(make_model("mlp")[0]), data())
        first = GradientSNR(every_n_steps=1)
        trainer = trainer_for(1, first)
        trainer.fit(Module(make_model("mlp")[0]), data())
        trainer.save_checkpoint(tmp_path / "one.ckpt")
        resumed = GradientSNR(every_n_steps=1)
        trainer_for(2, resumed).fit(
            Module(make_model("mlp")[0]), data(), ckpt_path=tmp_path / "one.ckpt"
        )
    assert int(resumed.noise_scale_ema.updates) == 4
    assert float(resumed.latest["noise_scale/smoothed"]) == pytest.approx(
        float(whole.latest["noise_scale/smoothed"]), rel=1e-12
    )


# ----------------------------------------------------------------------------- EB stopping
def test_eb_early_stopping_window() -> None:
    gsnr = GradientSNR(every_n_steps=1)
    stopper = EBEarlyStopping(window=3, threshold=-1e12)
    _, recorder, trainer = fit("mlp", gsnr, max_steps=10, extra=[stopper], n_samples=64)
    assert trainer.global_step == 3  # stops as soon as the first full window is in
    eb = [v["eb/criterion"] for _, _, v in recorder.steps]
    assert float(trainer.callback_metrics["eb/criterion_window"]) == pytest.approx(
        sum(eb) / 3, rel=1e-12
    )
    restored = EBEarlyStopping(window=3)
    restored.load_state_dict(stopper.state_dict())
    assert list(restored.values) == list(stopper.values)

    gsnr = GradientSNR(every_n_steps=1)
    _, _, trainer = fit("mlp", gsnr, max_steps=5, extra=[EBEarlyStopping(window=2, threshold=1e12)])
    assert trainer.global_step == 5


# ----------------------------------------------------------------------------- DDP
DDP_SCRIPT = r"""
import json, sys, warnings
sys.path.insert(0, {tests!r})
sys.path.insert(0, {root!r})
import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
import test_gradient_snr as t
from lightning_gradwatch import GradientSNR

class Gather(t.Recorder):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        batches, params, values = self.steps[-1]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, batches)
        self.steps[-1] = ([b for rank in everyone for b in rank], params, values)

warnings.filterwarnings("ignore")
net, x = t.make_model("mlp")
module = t.Module(net)
gsnr = GradientSNR(every_n_steps=1)
recorder = Gather(gsnr)
trainer = pl.Trainer(
    max_steps=2, accumulate_grad_batches=2, strategy="ddp", accelerator="cpu", devices=2,
    callbacks=[gsnr, recorder], logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
)
trainer.fit(module, DataLoader(TensorDataset(x, torch.arange(16) % 3), batch_size=2))
if trainer.global_rank == 0:
    result = []
    for batches, params, values in recorder.steps:
        result.append({{"values": values, "expected": t.oracle_for_step(module, batches, params),
                        "n": sum(len(b[0]) for b in batches)}})
    with open({out!r}, "w") as f:
        json.dump(result, f)
"""


@pytest.mark.slow
def test_ddp_statistics_describe_the_global_batch(tmp_path: Path) -> None:
    """Two gloo ranks x two micro-batches of 2: the logged values equal the single-process
    oracle on the concatenated 8 samples of each step."""
    out = tmp_path / "result.json"
    script = tmp_path / "ddp_gsnr.py"
    root = str(Path(__file__).resolve().parents[1])
    script.write_text(
        DDP_SCRIPT.format(tests=str(Path(__file__).parent), root=root, out=str(out)) + DDP_TEARDOWN
    )
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert len(result) == 2
    for step in result:
        assert step["n"] == 8 and step["values"]["gradwatch/batch_size"] == 8
        assert_close(step["values"], step["expected"])


def test_synced_sums_are_computes_and_partial_updates_add_up() -> None:
    """``synced`` (the callback's read, without torchmetrics' copies) gives what ``compute``
    gives, also after a pass that left a layer out (the per-layer path of ``update``)."""
    sums = GradientNoiseSums({"a": 2, "b": 3, "c": 1}, dtype=torch.float64)
    g = torch.randn(6, 6, dtype=torch.float64)
    parts = {"a": g[:, :2], "b": g[:, 2:5], "c": g[:, 5:]}
    first = {n: p[:4] for n, p in parts.items()}
    sums.update(
        {n: p.sum(0) for n, p in first.items()},
        {n: p.pow(2).sum(0) for n, p in first.items()},
        {n: p.pow(2).sum(1) for n, p in first.items()},
        4,
    )
    second = {n: parts[n][4:] for n in ("a", "c")}  # "b" left out of this pass
    sums.update(
        {n: p.sum(0) for n, p in second.items()},
        {n: p.pow(2).sum(0) for n, p in second.items()},
        {n: p.pow(2).sum(1) for n, p in second.items()},
        2,
    )
    synced, computed = sums.synced(), sums.compute()
    for got, want in zip(synced, computed, strict=True):
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=0, atol=0)
    assert synced.layer_count.tolist() == [6, 4, 6] and int(synced.count) == 6
    torch.testing.assert_close(
        synced.sample_sq_norm_sum,
        torch.stack([parts["a"].pow(2).sum(), first["b"].pow(2).sum(), parts["c"].pow(2).sum()]),
        rtol=1e-12,
        atol=0,
    )


@pytest.mark.parametrize(
    "values", [[0.5, 2.0, 1.0, 7.0], [3.0], [2.0, 2.0], [-1.0, 0.0, 4.0, 4.0, 4.0]]
)
def test_layer_histogram_bins(values: list[float]) -> None:
    from lightning_gradwatch.callbacks.gradient_snr import _layer_bins

    v = torch.tensor(values, dtype=torch.float64)
    edges, counts = _layer_bins(v)
    assert edges.shape == (v.numel() + 1,) and counts.shape == (v.numel(),)
    assert bool((edges[1:] > edges[:-1]).all())
    assert int(counts.sum()) == v.numel()
    for x in values:  # each value lies in a bin that counts it
        k = int(torch.searchsorted(edges, torch.tensor(x, dtype=torch.float64), right=True)) - 1
        k = min(max(k, 0), v.numel() - 1)
        assert edges[k] <= x <= edges[k + 1] and counts[k] >= 1


def test_restart_reads_zero_and_overwrites() -> None:
    """After ``restart`` the sums read zero until the next update, which overwrites the stale
    values when it has every layer and zeroes them first when it does not."""
    sizes = {"a": 2, "b": 3}
    sums = GradientNoiseSums(sizes, dtype=torch.float64)
    g = torch.randn(4, 5, dtype=torch.float64)
    full = (
        {"a": g[:, :2].sum(0), "b": g[:, 2:].sum(0)},
        {"a": g[:, :2].pow(2).sum(0), "b": g[:, 2:].pow(2).sum(0)},
        {"a": g[:, :2].pow(2).sum(1), "b": g[:, 2:].pow(2).sum(1)},
    )
    sums.update(*full, 4)
    sums.restart()
    assert not sums.synced().grad_sum.any() and int(sums.compute().count) == 0
    sums.update(*full, 4)
    sums.restart()
    sums.update(*full, 4)  # overwrites
    reference = GradientNoiseSums(sizes, dtype=torch.float64)
    reference.update(*full, 4)
    for got, want in zip(sums.synced(), reference.synced(), strict=True):
        assert torch.equal(got, want)
    sums.restart()
    only_a = tuple({"a": part["a"]} for part in full)
    sums.update(*only_a, 4)  # "b" left out: its stale slice must not survive
    out = sums.synced()
    assert not out.grad_sum[sums.layer_slice("b")].any()
    assert torch.equal(out.grad_sum[sums.layer_slice("a")], full[0]["a"])
    assert out.layer_count.tolist() == [4, 0]


def test_noise_statistics_counts_beyond_float32_exactness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers too large for an exact float32 count of their kept entries are counted in
    float64; both routes give the same statistics (the limit lowered to exercise it)."""
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(5, 9, generator=gen, dtype=torch.float32)
    g[:, 0] = 0.0  # a dead entry, left out
    s, q = g.sum(0), g.pow(2).sum(0)
    sizes = [6, 3]
    norms = torch.stack([p.pow(2).sum() for p in g.split(sizes, 1)])
    fast = fn.noise_statistics(s, q, norms, 5, sizes)
    monkeypatch.setattr(fn, "_EXACT_FLOAT32_COUNT", 4)
    wide = fn.noise_statistics(s, q, norms, 5, sizes)
    for key, value in fast.items():
        torch.testing.assert_close(wide[key], value, rtol=0, atol=0, equal_nan=True)
    assert float(fast["layer_gsnr"][0]) == pytest.approx(
        float(fn.gsnr_mean(s[:6], q[:6], 5)), rel=1e-6
    )


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_noise_statistics_consuming_the_sums_gives_the_same_values(eps: float) -> None:
    """``consume=True`` (the callback's call: the sums serve as scratch space) gives exactly
    the values of a call that leaves the sums alone, also with a reused workspace and a
    left-out layer."""
    gen = torch.Generator().manual_seed(5)
    sizes = [6, 4, 5]
    grads = torch.randn(7, sum(sizes), generator=gen, dtype=torch.float64)
    grads[:, 1] = 0.0  # a dead entry
    s, q = grads.sum(0), grads.pow(2).sum(0)
    norms = torch.stack([g.pow(2).sum() for g in grads.split(sizes, 1)])
    for complete in (None, torch.tensor([True, False, True])):
        want = fn.noise_statistics(s, q, norms, 7, sizes, eps=eps, complete=complete)
        workspace: list[Tensor] = []
        for _ in range(2):
            got = fn.noise_statistics(
                s.clone(),
                q.clone(),
                norms,
                7,
                sizes,
                eps=eps,
                complete=complete,
                workspace=workspace,
                consume=True,
            )
            for key, value in want.items():
                torch.testing.assert_close(got[key], value, rtol=0, atol=0, equal_nan=True)


def test_sums_read_zero_after_a_computed_step() -> None:
    """The callback computes a step's statistics in place in its sums; afterwards they read
    as an empty step (not as the overwritten values) until the next step's update."""
    gsnr = GradientSNR(every_n_steps=1)
    fit("mlp", gsnr, max_steps=2, log_every_n_steps=1)
    assert gsnr.sums is not None
    out = gsnr.sums.compute()
    assert int(out.count) == 0 and not out.grad_sum.any() and not out.grad_sq_sum.any()
    assert gsnr.latest_step == 1 and bool(torch.isfinite(gsnr.latest["gsnr/mean"]))


def test_ratio_ema_update_where_is_update_or_nothing() -> None:
    """``update_where`` gives exactly ``update`` where the flag holds and leaves every state
    alone where it does not (even with NaN inputs), without reading the flag on the host."""
    gated, plain = RatioEMA(0.7), RatioEMA(0.7)
    steps = [(2.0, 1.0, True), (float("nan"), 3.0, False), (4.0, 0.5, True), (5.0, 2.0, True)]
    for num, den, valid in steps:
        n = torch.tensor(num, dtype=torch.float64)
        d = torch.tensor(den, dtype=torch.float64)
        got = gated.update_where(torch.tensor(valid), n, d)
        if valid:
            plain.update(n, d)
        assert torch.equal(gated.numerator, plain.numerator)
        assert torch.equal(gated.denominator, plain.denominator)
        assert torch.equal(gated.updates, plain.updates)
        assert torch.equal(got, plain.compute())


def test_gradient_snr_state_key_is_cached_and_follows_its_inputs() -> None:
    gsnr = GradientSNR(params=["0.weight"])
    first = gsnr.state_key
    assert gsnr.state_key is first  # cached: Lightning reads it around every hook call
    assert gsnr.params is not None
    gsnr.params.append("2.weight")  # changed in place: the key follows
    assert gsnr.state_key == GradientSNR(params=["0.weight", "2.weight"]).state_key
    gsnr.every_n_steps = 7
    assert "7" in gsnr.state_key
    assert gsnr.state_key != GradientSNR(params=["0.weight", "2.weight"]).state_key
