"""All callbacks together, as the README's quick start uses them."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import (
    GradientSNR,
    GradientWeightAlignment,
    GWAEarlyStopping,
    IndexedDataset,
    SpectralNorms,
)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, _ = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callbacks: list[pl.Callback], **trainer_kwargs: object) -> Classifier:
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=16, shuffle=False)
    model = Classifier()
    trainer = pl.Trainer(
        callbacks=callbacks,
        default_root_dir=tmp_path,
        **{"max_epochs": 3, "log_every_n_steps": 2, **trainer_kwargs},
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    return model


def test_quick_start_runs_and_logs_every_family(tmp_path) -> None:
    gwa = GradientWeightAlignment(indices=-1)
    callbacks = [gwa, GWAEarlyStopping(patience=5), GradientSNR(), SpectralNorms()]
    model = _fit(tmp_path, callbacks)
    metrics = model.trainer.callback_metrics
    for key in ("gwa/aggregate", "gwa/mean", "gsnr/mean", "noise_scale/simple", "gsnr/coherence"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    # Per-layer keys are written in one batch per step, yet stay monitorable.
    assert torch.isfinite(metrics["gsnr_layers/gsnr/net.0.weight"])
    assert torch.isfinite(metrics["spectral_layers/sigma_max/net.2.weight"])
    assert torch.isfinite(metrics["spectral/max_sigma_max"])
    worst = gwa.most_misaligned(5)
    assert worst.shape == (5,) and int(worst.max()) < 64 and int(worst.min()) >= 0


def test_per_layer_keys_reach_the_logger(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    _fit(
        tmp_path,
        [GradientSNR(), SpectralNorms()],
        logger=CSVLogger(tmp_path),
        max_epochs=1,
        log_every_n_steps=1,
    )
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for key in (
        "gsnr/mean",
        "gsnr_layers/gsnr/net.0.weight",
        "spectral_layers/sigma_max/net.0.weight",
    ):
        assert key in header.split(","), key


def test_all_callbacks_leave_training_bitwise_unchanged(tmp_path) -> None:
    plain = _fit(tmp_path / "plain", [])
    watched = _fit(
        tmp_path / "watched",
        [GradientWeightAlignment(indices=-1), GradientSNR(every_n_steps=1), SpectralNorms()],
    )
    for (name, a), b in zip(plain.named_parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b), name
