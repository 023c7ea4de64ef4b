"""``loss_reduction="auto"``: measured on the first batch, checked when declared, refused when
the loss is neither a mean nor a sum of per-sample losses.

Exactness: with a sum-reduced loss and default settings, every GradientSNR quantity (the
absolute ``noise_scale/trace_sigma`` and ``noise_scale/grad_sq_norm`` included) matches the float64
brute-force oracle at rtol=1e-6.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientSNR, GradientWeightAlignment

sys.path.insert(0, str(Path(__file__).parent))
from test_gradient_snr import Recorder, assert_close, make_model, oracle_for_step

Loss = Callable[[Tensor, Tensor], Tensor]


def info_nce(out: Tensor, y: Tensor) -> Tensor:
    """Contrastive: each sample's logits are its similarities to every sample of the batch."""
    return F.cross_entropy(out @ out.T, torch.arange(len(out)))


def centred(out: Tensor, y: Tensor) -> Tensor:
    """Mixes samples through a batch statistic that repeating the batch leaves unchanged."""
    return F.cross_entropy(out - out.mean(0), y)


LOSSES: dict[str, Loss] = {
    "mean": lambda out, y: F.cross_entropy(out, y),
    "sum": lambda out, y: F.cross_entropy(out, y, reduction="sum"),
    "info_nce": info_nce,
    "centred": centred,
}


class Net(pl.LightningModule):
    def __init__(self, net: nn.Module, loss: str, manual: bool = False) -> None:
        super().__init__()
        self.net = net
        self.loss = LOSSES[loss]
        self.automatic_optimization = not manual

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def mlp(dropout: float = 0.0, batchnorm: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(6, 8), nn.Tanh()]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(8, 3))
    return nn.Sequential(*layers)


def loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return DataLoader(TensorDataset(x, torch.arange(n) % 3), batch_size=batch_size)


def run(
    module: pl.LightningModule,
    callbacks: list[pl.Callback],
    tmp_path: Path,
    data: DataLoader | None = None,
    max_steps: int = 2,
) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=max_steps,
        log_every_n_steps=1,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no logger.*")
        trainer.fit(module, data if data is not None else loader())
    return trainer


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sum_reduced_loss_is_detected_and_exact(kind: str, tmp_path: Path) -> None:
    net, inputs = make_model(kind)
    targets = torch.arange(len(inputs)) % 3
    module = Net(net, "sum")
    gsnr = GradientSNR(every_n_steps=1)  # default loss_reduction="auto"
    recorder = Recorder(gsnr)
    run(module, [gsnr, recorder], tmp_path, DataLoader(TensorDataset(inputs, targets), 4))
    measurement = gsnr.reduction_measurement
    assert measurement is not None and measurement.verdict == "sum"
    assert measurement.ratio == pytest.approx(2.0, rel=1e-12)
    assert gsnr.probe is not None and gsnr.probe.loss_reduction == "sum"
    assert len(recorder.steps) == 2
    for batches, params, values in recorder.steps:
        # oracle_for_step differentiates each per-sample cross-entropy on its own, which is
        # independent of the reduction.
        assert_close(values, oracle_for_step(module, batches, params))


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("loss", ["mean", "sum"])
def test_reduction_is_measured_for_any_batch_size(
    loss: str, batch_size: int, tmp_path: Path
) -> None:
    # B = 1 cannot be split (and cannot mix samples); an odd B has halves of 2 and 1 samples,
    # which the mean hypothesis weights by their sizes.
    torch.manual_seed(0)
    gsnr = GradientSNR()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*effective batch has 1 sample.*")
        run(Net(mlp(), loss), [gsnr], tmp_path, loader(n=8, batch_size=batch_size))
    measurement = gsnr.reduction_measurement
    assert measurement is not None and measurement.verdict == loss
    assert measurement.batch_size == batch_size
    assert math.isnan(measurement.halves_loss) == (batch_size == 1)


def test_mean_is_detected_with_dropout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gsnr = GradientSNR(every_n_steps=1)
    run(Net(mlp(dropout=0.2), "mean"), [gsnr], tmp_path)
    measurement = gsnr.reduction_measurement
    assert measurement is not None and measurement.verdict == "mean"
    # Dropout makes two evaluations on the same batch differ; the tolerance widens with it
    # and still separates a mean (ratio 1) from a sum (ratio 2).
    assert measurement.noise > 0 and measurement.tolerance < 0.25
    assert abs(measurement.ratio - 1.0) <= measurement.tolerance


@pytest.mark.parametrize("loss", ["info_nce", "centred"])
def test_sample_mixing_loss_is_refused(loss: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="could not infer how training_step reduces") as info:
        run(Net(mlp(), loss), [GradientSNR(every_n_steps=1)], tmp_path)
    message = str(info.value)
    assert "mix samples" in message and "loss_reduction='mean'" in message


def test_declared_reduction_is_checked(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"loss_reduction='mean' was passed.*a 'sum'"):
        run(Net(mlp(), "sum"), [GradientSNR(loss_reduction="mean")], tmp_path)
    # Declared and confirmed: used as is.
    gsnr = GradientSNR(every_n_steps=1, loss_reduction="sum")
    run(Net(mlp(), "sum"), [gsnr], tmp_path)
    assert gsnr.reduction_measurement is not None
    assert gsnr.reduction_measurement.verdict == "sum"
    # Declared but not confirmable (the loss mixes samples): a warning, not a silent pass.
    with pytest.warns(UserWarning, match="could not confirm loss_reduction='mean'"):
        run(Net(mlp(), "centred"), [GradientSNR(loss_reduction="mean")], tmp_path)


def test_manual_optimisation_needs_a_declared_reduction(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="cannot be measured with manual optimisation"):
        run(Net(mlp(), "sum", manual=True), [GradientSNR()], tmp_path)
    # Declared: trusted (training_step returns no loss to measure).
    gsnr = GradientSNR(every_n_steps=1, loss_reduction="sum")
    run(Net(mlp(), "sum", manual=True), [gsnr], tmp_path)
    assert gsnr.reduction_measurement is None
    assert gsnr.probe is not None and gsnr.probe.loss_reduction == "sum"
    assert "noise_scale/trace_sigma" in gsnr.latest


def test_scale_free_callbacks_do_not_measure(tmp_path: Path) -> None:
    # GWA scores are cosines, independent of the reduction factor: no extra evaluation.
    gwa = GradientWeightAlignment()
    calls = []
    module = Net(mlp(), "sum")
    step = module.training_step
    module.training_step = lambda *a: calls.append(1) or step(*a)  # type: ignore[method-assign]
    run(module, [gwa], tmp_path)
    assert gwa.reduction_measurement is None and len(calls) == 2


def test_batchnorm_in_training_mode_is_refused_unless_declared(tmp_path: Path) -> None:
    # Train-mode BatchNorm mixes samples through the batch statistics: sample i's gradient is
    # not that of its own loss. The halves of the batch expose it (repeating it does not).
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        run(Net(mlp(batchnorm=True), "mean"), [GradientSNR()], tmp_path)
    with pytest.warns(UserWarning, match="could not confirm loss_reduction='mean'"):
        run(Net(mlp(batchnorm=True), "mean"), [GradientSNR(loss_reduction="mean")], tmp_path)


def test_measurement_leaves_training_unchanged(tmp_path: Path) -> None:
    # Dropout (random numbers), BatchNorm (running statistics) and self.log in training_step:
    # the extra evaluations on the first batch must leave no trace.
    def train(callbacks: list[pl.Callback]) -> dict[str, Tensor]:
        torch.manual_seed(0)
        module = Net(mlp(dropout=0.3, batchnorm=True), "mean")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*could not confirm.*")
            run(module, callbacks, tmp_path, max_steps=3)
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    plain = train([])
    gsnr = GradientSNR(every_n_steps=1, loss_reduction="mean")
    monitored = train([gsnr])
    assert gsnr.reduction_measurement is not None
    assert plain.keys() == monitored.keys()
    for name in plain:
        assert torch.equal(plain[name], monitored[name]), name
