"""Heatmap images with labelled axes and a colour bar (``lightning_gradwatch.heatmap``), and the
images ``SpectralNorms`` writes to TensorBoard with and without matplotlib."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import SpectralNorms
from lightning_gradwatch.callbacks.spectral import history as spectral_history
from lightning_gradwatch.heatmap import DPI, WIDTH_INCHES, heatmap_image


def _distinct_colours(image: torch.Tensor) -> int:
    return torch.unique((image * 255).round().to(torch.int64).flatten(1).T, dim=0).shape[0]


@pytest.mark.parametrize("diverging", [False, True])
def test_heatmap_image_shape_and_content(diverging: bool) -> None:
    values = torch.linspace(-2, 3, 4 * 50, dtype=torch.float64).reshape(4, 50)
    values[1, 7] = math.nan  # drawn grey, not a crash
    image = heatmap_image(
        values, [f"net.{i}.weight" for i in range(4)], list(range(0, 500, 10)), "t", "c", diverging
    )
    assert image.dim() == 3 and image.shape[0] == 3
    assert image.shape[2] == int(WIDTH_INCHES * DPI)
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    # Not blank: a colour ramp plus text, axes and a colour bar give many colours.
    assert _distinct_colours(image) > 100
    assert image.std() > 0.05


def test_heatmap_needs_one_label_per_row_and_step_per_column() -> None:
    with pytest.raises(ValueError, match="one label per row"):
        heatmap_image(torch.zeros(2, 3), ["a"], [0, 1, 2], "t", "c")


class _TwoLayers(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(autouse=True)
def _no_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every epoch end renders (these runs take milliseconds; the budget has its own test)."""
    monkeypatch.setattr(spectral_history, "HEATMAP_TIME_RATIO", 0.0)


def _logged_images(tmp_path: Path, max_epochs: int = 2) -> dict[str, list[tuple[int, int, int]]]:
    """Fit ``max_epochs`` x 4 steps with SpectralNorms; ``tag -> [(step, height, width)]`` of its
    images."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        default_root_dir=tmp_path,
        logger=logger,
        callbacks=[SpectralNorms(grad_every_n_steps=None)],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_TwoLayers(), DataLoader(data, batch_size=8))
    accumulator = EventAccumulator(logger.log_dir, size_guidance={IMAGES: 0})
    accumulator.Reload()
    return {
        tag: [(e.step, e.height, e.width) for e in accumulator.Images(tag)]
        for tag in accumulator.Tags()["images"]
    }


def test_spectral_norms_heatmaps_have_axes(tmp_path: Path) -> None:
    images = _logged_images(tmp_path)
    assert set(images) == {"spectral/heatmap/sigma_max_growth", "spectral/heatmap/log_sigma_max"}
    for sizes in images.values():
        assert len(sizes) == 2  # the first epoch's and the last one's
        assert all(width == int(WIDTH_INCHES * DPI) for _, _, width in sizes)  # matplotlib's


def test_spectral_norms_heatmaps_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spectral_history, "matplotlib_available", lambda: False)
    images = _logged_images(tmp_path)
    # The plain rendering: 2 layers x 128 px, 4 then 8 columns of 128 then 64 px.
    assert [size for _, *size in images["spectral/heatmap/log_sigma_max"]] == [[256, 512]] * 2


@pytest.mark.parametrize("time_ratio", [0.0, 1e9])
def test_heatmap_time_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, time_ratio: float
) -> None:
    """Without a budget every epoch end writes images; with a vanishing one no epoch end
    does, and the end of training writes the latest columns."""
    monkeypatch.setattr(spectral_history, "HEATMAP_TIME_RATIO", time_ratio)
    images = _logged_images(tmp_path, max_epochs=3)["spectral/heatmap/log_sigma_max"]
    steps = [step for step, _, _ in images]
    assert steps == ([4, 8, 12] if time_ratio == 0 else [12])
