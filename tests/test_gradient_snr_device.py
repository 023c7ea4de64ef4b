"""GradientSNR keeps its per-step decisions on the device: no host-device synchronisation on
non-logging steps, and layers that miss samples are left out exactly (against the float64
oracle) through device masks."""

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
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import EBEarlyStopping, GradientSNR, SpectralNorms
from lightning_gradwatch.loggers import is_logging_step

sys.path.insert(0, str(Path(__file__).parent))
from host_syncs import count_host_syncs, in_files
from test_gradient_snr import assert_close, expected_quantities, make_model

#: Files whose per-step code must not synchronise off logging steps.
WATCHED = in_files("gradient_snr.py", "eb_early_stopping.py", "spectral")


class SyncCounter:
    """Whether the current batch's calls are counted (see :class:`Window`)."""

    def __init__(self) -> None:
        self.counting = False


class Window(pl.Callback):
    """Opens (first in the callback list) or closes (last) the counting window of a batch:
    every callback hook of a non-logging step runs inside it."""

    def __init__(self, counter: SyncCounter, opens: bool) -> None:
        self.counter, self.opens = counter, opens

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self.opens:
            self.counter.counting = not is_logging_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if not self.opens:
            self.counter.counting = False


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("every_n_steps", [1, None])
def test_no_host_sync_on_non_logging_steps(every_n_steps: int | None) -> None:
    net, inputs = make_model("mlp")
    counter = SyncCounter()
    gsnr = GradientSNR(every_n_steps=every_n_steps)
    callbacks = [
        Window(counter, opens=True),
        gsnr,
        EBEarlyStopping(window=2, threshold=1e12) if every_n_steps is None else SpectralNorms(),
        Window(counter, opens=False),
    ]
    trainer = pl.Trainer(
        max_steps=8,
        log_every_n_steps=4,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with (
        warnings.catch_warnings(),
        count_host_syncs(WATCHED, enabled=lambda: counter.counting) as calls,
    ):
        warnings.filterwarnings("ignore", message=".*has no logger.*")
        trainer.fit(Classifier(net), DataLoader(TensorDataset(inputs, torch.arange(16) % 3), 2))
    assert trainer.global_step == 8
    assert not calls, dict(calls)
    # The statistics were computed (every step, or on the logging steps) all the same.
    assert int(gsnr.noise_scale_ema.updates) == (8 if every_n_steps == 1 else 2)
    assert gsnr.latest_step == 7


# ----------------------------------------------------------------------------- partial layers
class Branchy(nn.Module):
    """``a`` on every sample; ``b`` on every sample when ``full``, else on the first two rows
    only: a subset of the batch, which has no per-sample statistics (the probe leaves ``b``
    out of that backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x: Tensor, full: bool) -> Tensor:
        out = self.a(torch.tanh(x))
        if full:
            return out + self.b(x)
        return torch.cat([out[:2] + self.b(x[:2]), out[2:]])


class BranchModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = Branchy().double()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x, batch_idx % 2 == 0), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Snapshot(pl.Callback):
    def __init__(self) -> None:
        self.params: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_layer_missing_samples_is_left_out_exactly(eps: float) -> None:
    """``b`` has per-sample statistics for the first micro-batch only: it is left out, and
    every value is the oracle's on ``a`` alone, the parameters with complete statistics."""
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(8, 6, generator=g, dtype=torch.float64)
    targets = torch.arange(8) % 3
    module = BranchModule()
    gsnr = GradientSNR(every_n_steps=1, eps=eps)
    snapshot = Snapshot()
    trainer = pl.Trainer(
        max_steps=1,
        accumulate_grad_batches=2,
        log_every_n_steps=1,
        callbacks=[gsnr, snapshot],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(TensorDataset(inputs, targets), batch_size=4))
    assert any("net.b.weight" in str(w.message) and "left out" in str(w.message) for w in caught)
    # The oracle: per-sample gradients of a, each sample through the forward it saw.
    params = snapshot.params[0]
    net = Branchy().double()
    net.load_state_dict({k.removeprefix("net."): v for k, v in params.items()})
    grads: dict[str, list[Tensor]] = {"net.a.weight": [], "net.a.bias": []}
    for i in range(8):
        net.zero_grad()
        # Samples 0-3 (first micro-batch) and 4, 5 (first rows of the second) went through b.
        out = net(inputs[i : i + 1], full=True) if i < 6 else net.a(torch.tanh(inputs[i : i + 1]))
        F.cross_entropy(out, targets[i : i + 1]).backward()
        grads["net.a.weight"].append(net.a.weight.grad.clone())
        grads["net.a.bias"].append(net.a.bias.grad.clone())
    expected = expected_quantities({k: torch.stack(v) for k, v in grads.items()}, eps=eps)
    latest = gsnr.latest
    assert_close(latest, expected)
    assert not any(".b." in k for k in latest)
    assert math.isfinite(float(latest["noise_scale/smoothed"]))


# ----------------------------------------------------------------------------- off logging steps
def test_eb_and_skip_count_see_every_computed_step_off_logging_steps() -> None:
    """Computed every step, logged every 50: EBEarlyStopping still takes each step's criterion
    (it stops once its first window of 3 is full), and a poisoned step is skipped and counted
    without any logging step in between."""
    from test_gradient_snr import fit

    gsnr = GradientSNR(every_n_steps=1)
    stopper = EBEarlyStopping(window=3, threshold=-1e12)
    _, recorder, trainer = fit(
        "mlp", gsnr, max_steps=10, log_every_n_steps=50, extra=[stopper], n_samples=64
    )
    assert trainer.global_step == 3
    assert list(stopper.values) == [v["eb/criterion"] for _, _, v in recorder.steps]

    gsnr = GradientSNR(every_n_steps=1)
    # The last batch (SGD's non-finite update would poison every later step).
    _, recorder, _ = fit("mlp", gsnr, max_steps=4, log_every_n_steps=50, poison_batch=3)
    assert gsnr.skipped_steps == 1
    assert int(gsnr.noise_scale_ema.updates) == 3
    assert [bool(v) for _, _, v in recorder.steps] == [True, True, True, False]
    assert gsnr.latest_step == 2


def test_skips_are_counted_on_the_device_until_read() -> None:
    """No recorder reads ``latest`` between steps here: the skipped step stays a device count
    until the fit's end reads it, and never enters the EMA."""
    from test_gradient_snr import Module

    net, inputs = make_model("mlp")
    gsnr = GradientSNR(every_n_steps=1)
    trainer = pl.Trainer(
        max_steps=4,
        log_every_n_steps=50,
        callbacks=[gsnr],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no logger.*")
        loader = DataLoader(TensorDataset(inputs, torch.arange(16) % 3), batch_size=4)
        trainer.fit(Module(net, poison_batch=3), loader)
    state = gsnr._device_state
    assert state is not None and int(state.skipped) + gsnr._skipped_host == 1
    assert gsnr.skipped_steps == 1 and int(gsnr.noise_scale_ema.updates) == 3
    assert gsnr.latest_step == 2 and math.isfinite(float(gsnr.latest["noise_scale/smoothed"]))
