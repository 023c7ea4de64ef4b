"""GradientSNR under Lightning's 16-bit and 64-bit precisions, and on overflow steps.

16-bit runs are compared with a brute force in the *same* precision: one backward per sample
through the same forward (same autocast, same 16-bit parameters), with the loss multiplied by
the factor the training backward used (``loss_scale / B``, a power of two, so every backprop
is bit-identical to the batched pass), and the statistics then formed in float64 from those
per-sample gradients. The tolerance is derived from the dtype in :func:`rounding_bound`.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientSNR
from lightning_gradwatch._lightning import active_grad_scaler
from lightning_gradwatch.callbacks.gradient_snr import optimizer_steps_done

sys.path.insert(0, str(Path(__file__).parent))
from test_gradient_snr import Module, Recorder, assert_close, fit, make_model, oracle_for_step

#: Samples per batch: a power of two, so the mean reduction's ``1/B`` commutes with rounding.
BATCH = 32

#: Unit roundoff ``2**-p`` of each 16-bit format (``p`` significand bits, implicit bit included).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

#: The quantities compared, as GradientSNR logs them.
KEYS = (
    "gsnr/mean",
    "noise_scale/simple",
    "gsnr/coherence",
    "eb/criterion",
    "noise_scale/trace_sigma",
    "noise_scale/grad_sq_norm",
)


def definitions(grads: Tensor, zero_variance_rtol: float) -> dict[str, Tensor]:
    """Every compared quantity from per-sample gradients ``(B, D)`` (float64), differentiably.

    Written from the definitions (``torch.var`` over samples). Entries whose variance is at
    most ``zero_variance_rtol`` times their mean square are left out of the GSNR and EB means,
    as GradientSNR does with ``eps=0``.
    """
    batch = grads.shape[0]
    mean = grads.mean(0)
    variance = grads.var(0, unbiased=False)
    with torch.no_grad():
        keep = variance > zero_variance_rtol * grads.pow(2).mean(0)
    trace = (grads - mean).pow(2).sum() / (batch - 1)
    true_sq = mean.pow(2).sum() - trace / batch
    return {
        "gsnr/mean": (mean[keep] ** 2 / variance[keep]).mean(),
        "noise_scale/simple": trace / true_sq,
        "gsnr/coherence": grads.sum(0).pow(2).sum() / (batch * grads.pow(2).sum()),
        "eb/criterion": 1 - batch * (mean[keep] ** 2 / grads.var(0)[keep]).mean(),
        "noise_scale/trace_sigma": trace,
        "noise_scale/grad_sq_norm": true_sq,
    }


def rounding_bound(
    grads: Tensor, unit_roundoff: float, zero_variance_rtol: float
) -> dict[str, float]:
    """First-order bound on each quantity's change when every per-sample gradient entry moves
    by a relative ``unit_roundoff``: ``u * sum_ij |df/dg_ij| |g_ij|``.

    Why this is the tolerance: the brute force rounds each per-sample gradient to the 16-bit
    dtype (autograd's weight gradient for one sample is a 16-bit matmul output), while the
    probe keeps the float32 products of the same 16-bit activations and backprops. The two
    per-sample gradients therefore differ entry by entry by at most one 16-bit rounding, a
    relative ``u``; everything after that is float32 or float64 and far smaller.
    """
    grads = grads.detach().clone().requires_grad_(True)
    values = definitions(grads, zero_variance_rtol)
    bound = {}
    for key, value in values.items():
        (sensitivity,) = torch.autograd.grad(value, grads, retain_graph=True)
        bound[key] = unit_roundoff * float((sensitivity.abs() * grads.detach().abs()).sum())
    return bound


# ----------------------------------------------------------------------------- models
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)
    )


def data(kind: str) -> TensorDataset:
    """Inputs offset from zero and labels from a fixed teacher: coherent gradients, so many
    entries have a high GSNR, where ``Q/B - (S/B)**2`` cancels most (and where 16-bit batch
    sums used to be wrong by a factor of 1.5 to 37)."""
    g = torch.Generator().manual_seed(0)
    shape = (2 * BATCH, 8) if kind == "mlp" else (2 * BATCH, 1, 4, 4)
    inputs = torch.randn(*shape, generator=g) + 3.0
    teacher = torch.randn(inputs[0].numel(), 4, generator=g)
    return TensorDataset(inputs, (inputs.flatten(1) @ teacher).argmax(1))


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def trainer_for(
    precision: str, callbacks: list[pl.Callback], tmp_path: Path, **kw: Any
) -> pl.Trainer:
    return pl.Trainer(
        precision=precision,  # type: ignore[arg-type]
        callbacks=callbacks,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **kw,
    )


def same_precision_grads(
    trainer: pl.Trainer, module: Classifier, batch: Any, params: dict[str, Tensor], factor: float
) -> Tensor:
    """``(B, D)`` float64 per-sample gradients, one backward per sample in the run's precision.

    ``factor`` multiplies each sample's loss before its backward (and divides the gradient
    after), as ``loss_scale / B`` does in training, so the 16-bit backprops match bit for bit.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(params[name])
    plugin = trainer.precision_plugin
    x, y = plugin.convert_input(batch)
    named = list(module.named_parameters())
    with plugin.forward_context():
        losses = F.cross_entropy(module(x), y, reduction="none")
    rows = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i] * factor, [p for _, p in named], retain_graph=True)
        rows.append(torch.cat([g.double().reshape(-1) / factor for g in grads]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- 16-bit
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true"])
def test_16bit_matches_same_precision_brute_force(
    kind: str, precision: str, tmp_path: Path
) -> None:
    # 16-mixed runs on CPU in Lightning 2.6 (autocast float16 and GradScaler("cpu")). A small
    # initial scale keeps this run free of overflow steps; those are tested below.
    init_scale = 2.0**8
    plugins = []
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    torch.manual_seed(0)
    module = Classifier(mlp() if kind == "mlp" else cnn())
    gsnr = GradientSNR(every_n_steps=1)
    recorder = Recorder(gsnr)
    trainer = trainer_for(
        precision if not plugins else None,  # type: ignore[arg-type]
        [gsnr, recorder],
        tmp_path,
        plugins=plugins,
        max_steps=2,
        log_every_n_steps=1,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no logger.*")
        trainer.fit(module, DataLoader(data(kind), batch_size=BATCH))
    assert gsnr.skipped_steps == 0 and len(recorder.steps) == 2
    dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
    # The sums are float32 (the parameters' dtype or wider): the callback's zero-variance
    # threshold is 64 float32 epsilons.
    assert gsnr.sums is not None and gsnr.sums.grad_sum.dtype == torch.float32
    zero_variance_rtol = 64 * torch.finfo(torch.float32).eps
    scales = [init_scale / BATCH if plugins else 1.0 / BATCH] * 2
    for (batches, params, values), factor in zip(recorder.steps, scales, strict=True):
        grads = same_precision_grads(trainer, module, batches[0], params, factor)
        expected = {k: float(v) for k, v in definitions(grads, zero_variance_rtol).items()}
        bound = rounding_bound(grads, UNIT_ROUNDOFF[dtype], zero_variance_rtol)
        for key in KEYS:
            # Twice the first-order bound: room for the second-order terms and the float32
            # accumulation, both orders of magnitude below it here.
            got, want = values[key], expected[key]
            assert abs(got - want) <= 2 * bound[key], (key, got, want, bound[key])


def test_rule_without_float32_batch_sum_is_refused_under_16_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A rule that leaves ParamStats.grad_sum unset gets autograd's batch gradient instead:
    # exact at 32 bits, but rounded to 16 bits under autocast, so the probe refuses the layer.
    from lightning_gradwatch import GradientProbe
    from lightning_gradwatch.probe.rules.linear import LinearRule

    compute = LinearRule.compute

    def without_grad_sum(self: LinearRule, *args: Any) -> dict[str, Any]:
        result = compute(self, *args)
        for stats in result.values():
            stats.grad_sum = None
        return result

    monkeypatch.setattr(LinearRule, "compute", without_grad_sum)
    torch.manual_seed(0)
    model = mlp()
    x, y = data("mlp").tensors
    for dtype, refused in ((torch.bfloat16, True), (torch.float32, False)):
        probe = GradientProbe(model, sum_grad_squared=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with probe, torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        messages = [str(w.message) for w in caught]
        assert any("no float32 sum of per-sample gradients" in m for m in messages) == refused
        assert (probe.stats.names == []) == refused


# ----------------------------------------------------------------------------- 64-bit
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_64_true_on_a_float32_model_matches_float64_oracle(kind: str, tmp_path: Path) -> None:
    net, inputs = make_model(kind)
    net = net.float()  # built in float32; Lightning casts it to float64 after setup
    targets = torch.arange(len(inputs)) % 3
    module = Module(net)
    gsnr = GradientSNR(every_n_steps=1)
    recorder = Recorder(gsnr)
    trainer = trainer_for("64-true", [gsnr, recorder], tmp_path, max_steps=2, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no logger.*")
        trainer.fit(module, DataLoader(TensorDataset(inputs.float(), targets), batch_size=4))
    assert gsnr.sums is not None and gsnr.sums.grad_sum.dtype == torch.float64
    assert len(recorder.steps) == 2
    for batches, params, values in recorder.steps:
        batches = [(x.double(), y) for x, y in batches]
        assert_close(values, oracle_for_step(module, batches, params))


# ----------------------------------------------------------------------------- overflow
class ScaleRecorder(pl.Callback):
    """Whether the GradScaler skipped each optimizer step (its scale shrinks exactly then)."""

    def __init__(self) -> None:
        self.skipped: list[bool] = []
        self._scale = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self._scale = active_grad_scaler(trainer).get_scale()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.skipped.append(active_grad_scaler(trainer).get_scale() < self._scale)


def test_gradscaler_overflow_steps_are_skipped_and_counted(tmp_path: Path) -> None:
    # A huge initial scale overflows the float16 backward on the first steps; the GradScaler
    # skips those optimizer steps and halves its scale until the backward fits.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1000)
    torch.manual_seed(0)
    module = Classifier(mlp())
    gsnr = GradientSNR(every_n_steps=1)
    scales = ScaleRecorder()
    trainer = trainer_for(
        None,  # type: ignore[arg-type]
        [gsnr, scales],
        tmp_path,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        max_steps=40,
        log_every_n_steps=1,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no logger.*")
        trainer.fit(module, DataLoader(data("mlp"), batch_size=BATCH))
    overflowed = sum(scales.skipped)
    assert 1 <= overflowed < len(scales.skipped), scales.skipped
    assert gsnr.skipped_steps == overflowed
    assert float(trainer.callback_metrics["gradwatch/skipped_steps"]) == overflowed
    # Only the steps the optimizer took entered the EMA, and nothing non-finite did.
    ema = gsnr.noise_scale_ema
    assert int(ema.updates) == len(scales.skipped) - overflowed
    assert math.isfinite(float(ema.numerator)) and math.isfinite(float(ema.denominator))
    assert all(math.isfinite(float(v)) for k, v in gsnr.latest.items() if "noise_scale" in k)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_inf_in_one_backward_skips_the_step_and_leaves_the_ema_alone(accumulate: int) -> None:
    # The last batch has an infinite loss (the last, so SGD's non-finite update poisons no
    # later step): with accumulation its optimizer step also holds a finite micro-batch, and
    # the whole step is skipped, counted once.
    gsnr = GradientSNR(every_n_steps=1)
    _, recorder, trainer = fit(
        "mlp",
        gsnr,
        batch_size=4 // accumulate,
        accumulate=accumulate,
        max_steps=4,
        poison_batch=4 * accumulate - 1,
    )
    poisoned_step = 3
    assert gsnr.skipped_steps == 1
    assert float(trainer.callback_metrics["gradwatch/skipped_steps"]) == 1.0
    computed = [v for _, _, v in recorder.steps]
    assert [bool(v) for v in computed] == [k != poisoned_step for k in range(4)]
    ema = gsnr.noise_scale_ema
    assert int(ema.updates) == 3
    # The skipped step contributes nothing: the EMA is that of the three computed steps.
    num = den = 0.0
    for k, values in enumerate(v for v in computed if v):
        weight = 0.0 if k == 0 else 0.9
        num = weight * num + (1 - weight) * values["noise_scale/trace_sigma"]
        den = weight * den + (1 - weight) * values["noise_scale/grad_sq_norm"]
    assert float(ema.numerator) == pytest.approx(num, rel=1e-12)
    assert float(ema.denominator) == pytest.approx(den, rel=1e-12)
    assert gsnr.latest_step == 2 and optimizer_steps_done(trainer) == 4
