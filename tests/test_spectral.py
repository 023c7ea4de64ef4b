"""SpectralNorms and functional/spectral.py against exact references.

References: ``torch.linalg.matrix_norm(ord=2)`` and ``svdvals`` in float64 for norms and
spectra, ``scipy.stats.entropy`` for the effective rank, explicit operator matrices (conv applied
to every basis vector) for the reshaping convention and the FFT conv norm.
"""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import scipy.stats
import torch
from ddp_scripts import DDP_TEARDOWN
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import nn
from torch.nn import functional as F

from lightning_gradwatch import SpectralNorms
from lightning_gradwatch.callbacks.spectral import callback as spectral_callback
from lightning_gradwatch.functional.spectral import (
    as_matrix,
    conv_operator_norm_fft,
    effective_rank,
    gradient_spectrum,
    init_power_iteration_vectors,
    log_lipschitz_upper_bound,
    nuclear_norm,
    power_iteration,
    stable_rank,
)

# Deterministic examples: the suite must not flake on a rare draw.
HYP = settings(max_examples=40, deadline=None, derandomize=True)


def with_spectrum(singular_values: list[float], rows: int, cols: int, seed: int) -> torch.Tensor:
    """A float64 ``rows x cols`` matrix with the given singular values (random bases)."""
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T


def run_power_iteration(matrix: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, v = init_power_iteration_vectors(*matrix.shape, generator=g, dtype=matrix.dtype)
    sigma, _, _ = power_iteration(matrix, u, v, n)
    return sigma


def rel_err(estimate: torch.Tensor | float, exact: torch.Tensor | float) -> float:
    return abs(float(exact) - float(estimate)) / float(exact)


# --------------------------------------------------------------------------------------------
# functional
# --------------------------------------------------------------------------------------------
@HYP
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_power_iteration_matches_matrix_norm_after_warmup(rows, cols, seed, scale):
    w = scale * torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).double()
    exact = torch.linalg.matrix_norm(w, ord=2)
    sigma = run_power_iteration(w, 500, seed)
    assert float(sigma) <= float(exact) * (1 + 1e-12)  # |Wv| with |v| = 1 never overshoots
    assert rel_err(sigma, exact) <= 1e-3


@pytest.mark.parametrize("gap", [1e-2, 1e-5, 0.0])
def test_power_iteration_nearly_degenerate_top_singular_values(gap):
    # Nearly equal top singular values slow the vectors down, not the value: any vector in the
    # top-2 subspace already gives sigma within the gap.
    w = with_spectrum([1.0, 1.0 - gap, 0.9, 0.5, 0.1], 30, 20, seed=1)
    assert rel_err(run_power_iteration(w, 40), torch.linalg.matrix_norm(w, ord=2)) <= 1e-3


def test_power_iteration_warm_start_tracks_changing_weights():
    # One iteration per call, warm-started, on weights drifting like a training run.
    g = torch.Generator().manual_seed(0)
    w = with_spectrum([3.0, 2.0, 1.0, 0.5], 16, 12, seed=2)
    u, v = init_power_iteration_vectors(16, 12, generator=g, dtype=torch.float64)
    errors = []
    for _ in range(60):
        w = w + 1e-3 * torch.randn(w.shape, generator=g, dtype=torch.float64)
        sigma, u, v = power_iteration(w, u, v, 1)
        errors.append(rel_err(sigma, torch.linalg.matrix_norm(w, ord=2)))
    assert errors[0] > 1e-3  # cold: not converged
    assert max(errors[20:]) <= 1e-3  # warm


def test_power_iteration_leaves_inputs_alone_and_handles_zero():
    w = torch.randn(5, 4, dtype=torch.float64)
    u, v = torch.ones(5, dtype=torch.float64) / 5**0.5, torch.ones(4, dtype=torch.float64) / 2
    u0, v0, w0 = u.clone(), v.clone(), w.clone()
    power_iteration(w, u, v, 3)
    assert torch.equal(u, u0) and torch.equal(v, v0) and torch.equal(w, w0)
    sigma, u1, _ = power_iteration(torch.zeros(5, 4), u.float(), v.float(), 2)
    assert float(sigma) == 0.0 and torch.isfinite(u1).all()
    with pytest.raises(ValueError, match="n_iterations"):
        power_iteration(w, u, v, 0)


@HYP
@given(rows=st.integers(1, 30), cols=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_nuclear_norm_and_effective_rank_match_svdvals_formulas(rows, cols, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).double()
    sigma, nuclear, erank = gradient_spectrum(w)
    s = torch.linalg.svdvals(w).numpy()
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(w, ord=2), rtol=1e-6, atol=0)
    torch.testing.assert_close(nuclear, torch.linalg.matrix_norm(w, ord="nuc"), rtol=1e-6, atol=0)
    assert float(erank) == pytest.approx(math.exp(scipy.stats.entropy(s)), rel=1e-6)
    assert 1 - 1e-9 <= float(erank) <= min(rows, cols) + 1e-9


def test_effective_rank_of_low_rank_and_zero_matrices():
    w = with_spectrum([2.0, 2.0, 2.0], 10, 8, seed=3)
    assert float(gradient_spectrum(w)[2]) == pytest.approx(3.0, rel=1e-6)  # flat -> exact rank
    rank_one = torch.outer(torch.arange(1.0, 6), torch.arange(1.0, 4)).double()
    assert float(gradient_spectrum(rank_one)[2]) == pytest.approx(1.0, rel=1e-6)
    s = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(effective_rank(s)[1], torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(nuclear_norm(s), torch.tensor([4.0, 0.0], dtype=torch.float64))


def test_stable_rank_and_log_lipschitz():
    w = with_spectrum([4.0, 2.0, 1.0], 9, 7, seed=4)
    sr = stable_rank(w.pow(2).sum(), torch.linalg.matrix_norm(w, ord=2))
    assert float(sr) == pytest.approx((16 + 4 + 1) / 16, rel=1e-12)
    assert float(stable_rank(torch.tensor(0.0), torch.tensor(0.0))) == 0.0
    sigmas = torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64)
    assert float(log_lipschitz_upper_bound(sigmas)) == pytest.approx(math.log(3.0), rel=1e-12)
    deep = torch.full((400,), 10.0, dtype=torch.float64)  # the product, 1e400, overflows float64
    assert float(log_lipschitz_upper_bound(deep)) == pytest.approx(400 * math.log(10.0))


@pytest.mark.parametrize("transposed", [False, True])
def test_conv_reshape_convention(transposed):
    # Row o of the matrix is output channel o's filter flattened as (in/groups, *kernel), so the
    # matrix times an unfolded input patch gives the conv output: the reshaped matrix IS the
    # per-position linear map of a Conv2d.
    torch.manual_seed(0)
    if not transposed:
        conv = nn.Conv2d(3, 5, kernel_size=(2, 3), bias=False).double()
        x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
        mat = as_matrix(conv.weight)
        assert mat.shape == (5, 3 * 2 * 3)
        patches = F.unfold(x, kernel_size=(2, 3))  # (B, in*kh*kw, positions)
        torch.testing.assert_close(
            (mat @ patches).reshape(2, 5, 5, 5), conv(x), rtol=1e-12, atol=1e-12
        )
    else:
        conv = nn.ConvTranspose2d(3, 4, kernel_size=2, bias=False).double()  # (in, out, kh, kw)
        mat = as_matrix(conv.weight, output_dim=1)
        assert mat.shape == (4, 3 * 2 * 2)
        for o in range(4):
            torch.testing.assert_close(mat[o], conv.weight[:, o].reshape(-1))
    with pytest.raises(ValueError, match="2 or more dimensions"):
        as_matrix(torch.zeros(3))


def explicit_operator(conv: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    """The conv's matrix: its output for every input basis vector, as columns."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    with torch.no_grad():
        return conv(basis).reshape(n, -1).T


@pytest.mark.parametrize(
    ("dim", "in_ch", "out_ch", "kernel", "grid", "groups", "dilation"),
    [
        (1, 2, 3, 3, 7, 1, 1),
        (2, 2, 3, 3, 5, 1, 1),
        (2, 4, 6, 3, 6, 2, 1),
        (2, 2, 2, 3, 7, 1, 2),
    ],
)
def test_conv_operator_norm_fft_is_exact_for_circular_convs(
    dim, in_ch, out_ch, kernel, grid, groups, dilation
):
    conv_cls = nn.Conv1d if dim == 1 else nn.Conv2d
    torch.manual_seed(5)
    conv = conv_cls(
        in_ch,
        out_ch,
        kernel,
        padding=dilation * (kernel - 1) // 2,
        padding_mode="circular",
        groups=groups,
        dilation=dilation,
        bias=False,
    ).double()
    op = explicit_operator(conv, (in_ch, *([grid] * dim)))
    assert op.shape[0] == out_ch * grid**dim  # same-size output: a circular conv
    exact = torch.linalg.matrix_norm(op, ord=2)
    fft = conv_operator_norm_fft(conv.weight, [grid] * dim, groups=groups, dilation=dilation)
    torch.testing.assert_close(fft, exact, rtol=1e-10, atol=0)
    # ... and it is a different quantity from the reshaped-matrix norm.
    reshaped = torch.linalg.matrix_norm(as_matrix(conv.weight.detach()), ord=2)
    assert abs(float(reshaped) - float(exact)) > 1e-6


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_operator_norm_fft_bounds_zero_padded_convs(stride):
    torch.manual_seed(6)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=stride, bias=False).double()
    exact = torch.linalg.matrix_norm(explicit_operator(conv, (2, 6, 6)), ord=2)
    bound = conv_operator_norm_fft(conv.weight, (6 + 2, 6 + 2))
    assert float(exact) <= float(bound) * (1 + 1e-12)
    with pytest.raises(ValueError, match="larger than the grid"):
        conv_operator_norm_fft(conv.weight, (2, 2))


# --------------------------------------------------------------------------------------------
# callback
# --------------------------------------------------------------------------------------------
class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call: what Lightning actually writes, and at which step."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, {k: float(v) for k, v in metrics.items()}))

    def series(self, key: str) -> list[tuple[int | None, float]]:
        return [(s, m[key]) for s, m in self.calls if key in m]


class MLP(pl.LightningModule):
    def __init__(self, lr: float = 0.05, dropout: float = 0.0, loss: str = "ce") -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 12),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(12, 10),
            nn.ReLU(),
            nn.Linear(10, 3),
        )
        self.lr = lr
        self.loss = loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.loss == "grow":  # gradient ascent on the weight norms: sigma_max explodes
            return -sum(p.pow(2).sum() for p in self.net.parameters())
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loader(n: int = 64, batch_size: int = 16) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


def fit(
    model: pl.LightningModule,
    callbacks: list[pl.Callback],
    logger: Any = None,
    ckpt_path: str | None = None,
    **kwargs: Any,
) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 2)
    kwargs.setdefault("log_every_n_steps", 1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="64-true",
        logger=logger if logger is not None else RecordingLogger(),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer


def test_training_is_bitwise_unchanged():
    # Dropout makes any use of the global RNG visible in the parameters.
    def run(callbacks: list[pl.Callback]) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = MLP(dropout=0.3)
        fit(model, callbacks, max_epochs=2)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    plain = run([])
    cb = SpectralNorms(exact_every_n_steps=1, grad_every_n_steps=1, power_iterations=1)
    monitored = run([cb])
    assert cb.last_values  # it did run
    assert plain.keys() == monitored.keys()
    for k in plain:
        assert torch.equal(plain[k], monitored[k]), k


def test_logged_values_against_exact_references(monkeypatch: pytest.MonkeyPatch) -> None:
    # The default exact schedule, scaled down to this 12-step run: checks at a layer's first
    # read, then 4 steps later, doubling after each pass (up to 16), back to 4 after a failure.
    monkeypatch.setattr(spectral_callback, "EXACT_INTERVAL_STEPS", 4)
    monkeypatch.setattr(spectral_callback, "MAX_EXACT_INTERVAL_STEPS", 16)
    torch.manual_seed(1)
    model = MLP()
    seen_grads: dict[str, torch.Tensor] = {}

    class GrabGrads(pl.Callback):  # runs after SpectralNorms in the same hook
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 4:
                for n, p in pl_module.named_parameters():
                    seen_grads[n] = p.grad.detach().clone()

    logger = RecordingLogger()
    cb = SpectralNorms(grad_every_n_steps=4)
    fit(model, [cb, GrabGrads()], logger=logger, max_epochs=3)
    names = ["net.0.weight", "net.3.weight", "net.5.weight"]
    assert cb.tracked_names == names  # Linear weights; biases are vectors

    # Weights: the last read is after the last optimizer step, i.e. of the final weights.
    sigmas = []
    check_counts = []
    for n in names:
        w = dict(model.named_parameters())[n].detach()
        exact = torch.linalg.matrix_norm(w, ord=2)
        sigma = logger.series(f"spectral_layers/sigma_max/{n}")[-1][1]
        assert rel_err(sigma, exact) <= 1e-3  # warm after 12 steps and 2 exact checks
        stable = logger.series(f"spectral_layers/stable_rank/{n}")[-1][1]
        assert stable == pytest.approx(float(w.pow(2).sum()) / sigma**2, rel=1e-9)
        sigmas.append(sigma)
        checks = logger.series(f"spectral_layers/power_iter_rel_err/{n}")
        # The first read is checked, its random start vectors refined first: converged.
        assert checks[0][0] == 0 and checks[0][1] <= 1e-3
        interval = None
        for (before, error), (after, _) in itertools.pairwise(checks):
            interval = 4 if interval is None or error > 1e-3 else min(2 * interval, 16)
            assert after - before == interval
        check_counts.append(len(checks))
    assert min(check_counts) < 3  # some layer's checks backed off
    last = {k: v for _, m in logger.calls for k, v in m.items()}
    assert last["spectral/max_sigma_max"] == pytest.approx(max(sigmas), rel=1e-12)
    assert last["spectral/mean_sigma_max"] == pytest.approx(sum(sigmas) / 3, rel=1e-12)
    assert last["spectral/log_lipschitz_upper_bound"] == pytest.approx(
        sum(math.log(s) for s in sigmas), rel=1e-12
    )

    # Gradients at steps 0, 4, 8 (3 reads); step 4 against svdvals of the same gradient.
    for n in names:
        grad_series = logger.series(f"spectral_layers/grad_sigma_max/{n}")
        assert len(grad_series) == 3
        s = torch.linalg.svdvals(seen_grads[n])
        assert grad_series[1][1] == pytest.approx(float(s[0]), rel=1e-6)
        assert logger.series(f"spectral_layers/grad_nuclear_norm/{n}")[1][1] == pytest.approx(
            float(s.sum()), rel=1e-6
        )
        assert logger.series(f"spectral_layers/grad_effective_rank/{n}")[1][1] == pytest.approx(
            math.exp(scipy.stats.entropy(s.numpy())), rel=1e-6
        )


def test_exact_check_reports_unconverged_error_then_refines():
    # lr = 0: the weights stay what we set, so the exact value is known at every step.
    torch.manual_seed(2)
    model = MLP(lr=0.0)
    with torch.no_grad():  # nearly flat spectrum: one cold iteration is far off
        model.net[3].weight.copy_(with_spectrum([1.0, 0.99, 0.98, 0.97, 0.96], 10, 12, seed=7))
    exact = float(torch.linalg.matrix_norm(model.net[3].weight.detach().double(), ord=2))
    logger = RecordingLogger()
    cb = SpectralNorms(
        params=["net.3.weight"], power_iterations=1, exact_every_n_steps=2, grad_every_n_steps=None
    )
    fit(model, [cb], logger=logger, max_epochs=1)
    sig = dict(logger.series("spectral_layers/sigma_max/net.3.weight"))
    err = logger.series("spectral_layers/power_iter_rel_err/net.3.weight")
    first_check_step, first_err = err[0]
    # The logged error is the true error of the sigma_max logged at that same step ...
    assert first_err == pytest.approx(rel_err(sig[first_check_step], exact), rel=1e-9)
    assert first_err > 1e-3  # ... and it says the estimate had not converged.
    # The check refined the vectors and doubled the iterations: later values are converged.
    assert cb.vectors.iterations["net.3.weight"] == 2
    assert err[-1][1] <= 1e-3
    assert rel_err(list(sig.values())[-1], exact) <= 1e-3


def test_default_schedule_rechecks_a_layer_after_a_non_finite_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Intervals longer than the run: the only checks are a layer's first read and the first
    # read after its vectors were restarted.
    monkeypatch.setattr(spectral_callback, "EXACT_INTERVAL_STEPS", 1000)
    torch.manual_seed(3)
    model = MLP(lr=0.0)
    kept: dict[str, torch.Tensor] = {}

    class Poison(pl.Callback):  # runs before SpectralNorms: only its read sees the NaN
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                kept["w"] = pl_module.net[3].weight.detach().clone()
                with torch.no_grad():
                    pl_module.net[3].weight.fill_(math.nan)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if "w" in kept:
                with torch.no_grad():
                    pl_module.net[3].weight.copy_(kept.pop("w"))

    logger = RecordingLogger()
    cb = SpectralNorms(params=["net.3.weight"], grad_every_n_steps=None)
    fit(model, [Poison(), cb], logger=logger, max_epochs=1)  # 4 reads, logged at steps 0 to 3
    assert cb.skipped_weight_reads == 1
    checks = logger.series("spectral_layers/power_iter_rel_err/net.3.weight")
    sigmas = dict(logger.series("spectral_layers/sigma_max/net.3.weight"))
    assert [step for step, _ in checks] == [0, 2]  # the first read, the first one after the NaN
    assert 1 not in sigmas  # the NaN read logged nothing
    exact = float(torch.linalg.matrix_norm(model.net[3].weight.detach(), ord=2))
    # Restarted from random vectors and warmed before its value was logged: converged.
    assert checks[1][1] <= 1e-3
    assert rel_err(sigmas[2], exact) <= 1e-3


def test_respects_log_every_n_steps():
    logger = RecordingLogger()
    cb = SpectralNorms(grad_every_n_steps=3)
    fit(MLP(), [cb], logger=logger, max_epochs=3, log_every_n_steps=2)  # 12 steps
    series = logger.series("spectral_layers/sigma_max/net.0.weight")
    assert len(series) == 6
    assert len(cb.history.steps) == 6  # no read on the steps Lightning does not log
    # gradient reads: first logging step at or after 0, 3, 6, 9 (logging steps are odd)
    assert len(logger.series("spectral_layers/grad_sigma_max/net.0.weight")) == 4


def test_selection_by_name_and_module_type():
    class Mixed(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.conv = nn.Conv1d(8, 8, 3, padding=1)
            self.up = nn.ConvTranspose1d(8, 4, 2)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 3)

    model = Mixed()
    cb = SpectralNorms()
    assert [t.name for t in cb._select(model)] == [
        "emb.weight",
        "conv.weight",
        "up.weight",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "head.weight",
    ]
    assert [t.output_dim for t in cb._select(model)][2] == 1  # ConvTranspose: (in, out, k)
    assert [t.name for t in SpectralNorms(module_types=[nn.Embedding])._select(model)] == [
        "emb.weight"
    ]
    assert [t.name for t in SpectralNorms(params=["attn.*"])._select(model)] == [
        "attn.in_proj_weight",
        "attn.out_proj.weight",
    ]
    both = SpectralNorms(params=["attn.*"], module_types=[nn.Linear])._select(model)
    assert [t.name for t in both] == ["attn.out_proj.weight"]
    with pytest.raises(ValueError, match="matches no parameter"):
        SpectralNorms(params=["encoder.*"])._select(model)
    with pytest.raises(ValueError, match="only vectors"):
        SpectralNorms(params=["*.bias"])._select(model)
    with pytest.raises(ValueError, match="no weight to track"):
        SpectralNorms(module_types=[nn.GRU])._select(model)
    with pytest.raises(ValueError, match="power_iterations"):
        SpectralNorms(power_iterations=0)
    with pytest.raises(ValueError, match="growth_alarm_factor"):
        SpectralNorms(growth_alarm_factor=0.5)
    # misconfiguration raises when training starts, not mid-run
    with pytest.raises(ValueError, match="matches no parameter"):
        fit(MLP(), [SpectralNorms(params=["nope"])], max_epochs=1)


def test_resume_continues_warm(tmp_path: Path):
    def values(logger: RecordingLogger) -> dict[tuple[int | None, str], float]:
        return {(s, k): v for s, m in logger.calls for k, v in m.items() if "sigma_max" in k}

    def callback() -> SpectralNorms:
        return SpectralNorms(power_iterations=1, grad_every_n_steps=None)

    # Models are float64 before the checkpoint is loaded into them, so no weight is rounded.
    torch.manual_seed(3)
    straight = RecordingLogger()
    fit(MLP().double(), [callback()], logger=straight, max_epochs=2)

    torch.manual_seed(3)
    trainer = fit(MLP().double(), [callback()], max_epochs=1)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = RecordingLogger()
    fit(MLP().double(), [callback()], logger=resumed, max_epochs=2, ckpt_path=str(ckpt))

    second_epoch = {k: v for k, v in values(straight).items() if k[0] is not None and k[0] >= 4}
    got = values(resumed)
    assert second_epoch and all(got[k] == v for k, v in second_epoch.items())  # bitwise

    # Control: the same checkpoint without the callback's state starts cold and differs.
    state = torch.load(ckpt, weights_only=False)
    state["callbacks"] = {}
    cold_ckpt = tmp_path / "cold.ckpt"
    torch.save(state, cold_ckpt)
    cold = RecordingLogger()
    fit(MLP().double(), [callback()], logger=cold, max_epochs=2, ckpt_path=str(cold_ckpt))
    assert any(values(cold)[k] != v for k, v in second_epoch.items())


def test_growth_alarm_warns_and_flags():
    logger = RecordingLogger()
    cb = SpectralNorms(growth_alarm_factor=2.0, growth_alarm_window=5, grad_every_n_steps=None)
    with pytest.warns(UserWarning, match="grew by more than 2.0x within 5 steps"):
        fit(MLP(lr=0.1, loss="grow"), [cb], logger=logger, max_epochs=3)
    flags = [v for _, v in logger.series("spectral/growth_alarm")]
    assert flags[0] == 0.0 and max(flags) == 3.0  # every layer explodes

    calm = RecordingLogger()
    fit(MLP(lr=0.0), [SpectralNorms(growth_alarm_factor=2.0)], logger=calm, max_epochs=1)
    assert {v for _, v in calm.series("spectral/growth_alarm")} == {0.0}


def test_non_finite_gradients_are_skipped_and_counted():
    class SkipNonFiniteSGD(torch.optim.SGD):
        """Skips steps with non-finite gradients, as AMP's GradScaler does."""

        def step(self, closure=None):  # type: ignore[override]
            with torch.enable_grad():
                loss = closure() if closure is not None else None
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if all(torch.isfinite(g).all() for g in grads):
                super().step()
            return loss

    class Poisoned(MLP):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * math.nan if self.global_step == 2 else loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return SkipNonFiniteSGD(self.parameters(), lr=0.05)

    logger = RecordingLogger()
    cb = SpectralNorms(grad_every_n_steps=1)
    fit(Poisoned(), [cb], logger=logger, max_epochs=1)
    assert cb.skipped_grad_steps == 1
    assert len(logger.series("spectral_layers/grad_sigma_max/net.0.weight")) == 3  # of 4 steps
    assert cb.skipped_weight_reads == 0
    assert all(math.isfinite(v) for _, m in logger.calls for v in m.values())


def test_heatmap_custom_scalars_and_conv_operator_norm_in_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from lightning_gradwatch.callbacks.spectral import history

    monkeypatch.setattr(history, "HEATMAP_TIME_RATIO", 0.0)  # every epoch end renders

    class CNN(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 4, 3, padding=1, padding_mode="circular")
            self.head = nn.Linear(4 * 6, 3)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.head(self.conv(x[:, None]).flatten(1)), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    model = CNN()
    logger = TensorBoardLogger(tmp_path, name="tb")
    recording = RecordingLogger()
    # An exact check (and so an operator norm) on every step: the last one is of the final
    # weights. At epoch ends only, the per-layer back-off may skip the last epoch's check.
    cb = SpectralNorms(conv_operator_norm=True, exact_every_n_steps=1)
    fit(model, [cb], logger=[logger, recording], max_epochs=2)

    tags: dict[str, int] = {}
    for path in Path(logger.log_dir).glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                tags[value.tag] = tags.get(value.tag, 0) + 1
    assert tags["spectral/heatmap/sigma_max_growth"] == 2  # one image per epoch
    assert tags["spectral/heatmap/log_sigma_max"] == 2
    assert tags["custom_scalars__config__"] >= 1
    assert tags["spectral_layers/sigma_max/conv.weight"] == 8

    # Circular padding, stride 1, input length 6: the FFT norm is the exact operator norm.
    conv_norm = recording.series("spectral_layers/conv_operator_norm/conv.weight")[-1][1]
    op = explicit_operator(model.conv.double(), (1, 6))
    bias_free = op - model.conv.bias.detach().repeat_interleave(6)[:, None]  # affine -> linear
    assert conv_norm == pytest.approx(float(torch.linalg.matrix_norm(bias_free, ord=2)), rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_values_on_cuda_as_on_cpu():
    w = with_spectrum([2.0, 1.5, 1.0], 40, 30, seed=8).float()
    cpu = run_power_iteration(w, 20)
    g = torch.Generator().manual_seed(0)
    u, v = init_power_iteration_vectors(40, 30, generator=g, device="cuda")
    sigma, u, v = power_iteration(w.cuda(), u, v, 20)
    assert u.device.type == "cuda"
    torch.testing.assert_close(sigma.cpu(), cpu, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        gradient_spectrum(w.cuda())[2].cpu(), gradient_spectrum(w)[2], rtol=1e-5, atol=0
    )


DDP_SCRIPT = r"""
import json, os, sys
import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from lightning_gradwatch import SpectralNorms


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Grab(pl.Callback):
    def __init__(self):
        self.grads = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 2:
            self.grads = {n: p.grad.tolist() for n, p in pl_module.named_parameters()}


torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
data = torch.utils.data.TensorDataset(
    torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
)
cb, grab = SpectralNorms(grad_every_n_steps=2), Grab()
trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, log_every_n_steps=1,
    logger=False, callbacks=[cb, grab], enable_progress_bar=False, enable_model_summary=False,
    enable_checkpointing=False,
)
trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
u = {k: v.tolist() for k, v in cb.vectors.u.items()}
out = {"values": cb.last_values, "u": u, "grads": grab.grads}
with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
    json.dump(out, f)
"""


@pytest.mark.slow
def test_ddp_ranks_agree_without_collectives(tmp_path: Path):
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_spectral.py"
    script.write_text(DDP_SCRIPT + DDP_TEARDOWN)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    # Each rank sees different samples, so identical gradient spectra mean they were read after
    # DDP's all-reduce; identical weights give identical norms and vectors with no collective.
    assert rank0["grads"] == rank1["grads"] and rank0["grads"]
    assert rank0["values"] == rank1["values"]
    assert any("grad_sigma_max" in k for k in rank0["values"])
    assert rank0["u"] == rank1["u"]
    # The gradient spectrum logged at step 2 is that of the all-reduced gradient.
    w = torch.tensor(rank0["grads"]["net.0.weight"], dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    assert rank0["values"]["spectral_layers/grad_nuclear_norm/net.0.weight"] == pytest.approx(
        float(s.sum()), rel=1e-5
    )


def test_gradient_accumulation_reads_once_per_optimizer_step():
    grads: list[torch.Tensor] = []

    class GrabGrads(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append(pl_module.net[0].weight.grad.detach().clone())

    logger = RecordingLogger()
    cb = SpectralNorms(grad_every_n_steps=1)
    fit(MLP(), [cb, GrabGrads()], logger=logger, max_epochs=1, accumulate_grad_batches=2)
    assert len(grads) == 2  # 4 batches, 2 optimizer steps
    assert len(cb.history.steps) == 2  # one weight read per optimizer step
    series = logger.series("spectral_layers/grad_sigma_max/net.0.weight")
    assert [v for _, v in series] == pytest.approx(
        [float(torch.linalg.svdvals(g)[0]) for g in grads], rel=1e-9
    )
