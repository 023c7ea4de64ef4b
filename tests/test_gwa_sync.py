"""The GWA family adds no host-device synchronisation on non-logging steps: counted on the CPU
by patching the synchronising ``Tensor`` methods during a real fit."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from host_syncs import count_host_syncs, in_files
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from test_gwa_callback import Classifier, make_data
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import (
    GradientWeightAlignment,
    GWAEarlyStopping,
    GWAReweighting,
    IndexedDataset,
)
from lightning_gradwatch.data import check_indices
from lightning_gradwatch.loggers import is_logging_step

#: The files of the GWA family: a synchronising call with one of them on the stack counts.
OWN_FILES = in_files(
    "gradient_weight_alignment.py",
    "_gwa_head.py",
    "_gwa_aggregate.py",
    "_gwa_samples.py",
    "_gwa_csv.py",
    "_gwa_checks.py",
    "gwa_early_stopping.py",
    "gwa_reweighting.py",
    "lightning_gradwatch/data.py",
)


class Window:
    """Whether the current batch is counted, and what was counted: ``where -> calls``."""

    def __init__(self) -> None:
        self.open = False
        self.counted_batches = 0


class Opens(Callback):
    """First in the callback list: opens the window on non-logging steps (after the first
    batch of the fit, whose checks are synchronous by design)."""

    def __init__(self, window: Window) -> None:
        self.window = window

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.window.open = trainer.global_step > 0 and not is_logging_step(trainer)
        self.window.counted_batches += self.window.open


class Closes(Callback):
    """Last in the callback list: closes the window after every callback's batch end."""

    def __init__(self, window: Window) -> None:
        self.window = window

    def on_train_batch_end(self, *args: Any) -> None:
        self.window.open = False


@pytest.mark.parametrize("params", ["head", "all"])
def test_no_synchronisation_on_non_logging_steps(tmp_path: Any, params: str) -> None:
    torch.manual_seed(0)
    window = Window()
    callbacks = [
        Opens(window),
        GradientWeightAlignment(params=params, indices=-1),
        GWAEarlyStopping(patience=None),
        *([GWAReweighting(warmup_epochs=1)] if params == "head" else []),
        Closes(window),
    ]
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        precision="64-true",
        logger=TensorBoardLogger(tmp_path),
        log_every_n_steps=4,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    loader = DataLoader(IndexedDataset(TensorDataset(*make_data())), batch_size=8)
    with (
        warnings.catch_warnings(),
        count_host_syncs(OWN_FILES, whole_stack=True, enabled=lambda: window.open) as calls,
    ):
        warnings.simplefilter("ignore")  # e.g. GWAEarlyStopping beside GWAReweighting
        trainer.fit(Classifier().double(), loader)
    assert window.counted_batches >= 10  # a real window: most steps are non-logging steps
    assert not calls, dict(calls)


def test_the_count_sees_a_synchronisation_in_the_family() -> None:
    """The counter itself: the immediate index check reads its values back, and is counted."""
    with count_host_syncs(OWN_FILES, whole_stack=True) as calls:
        assert check_indices(torch.tensor([3, 1, 2]), "index", None) == 4
    ((where, n),) = calls.items()
    assert n == 1 and "/data.py:" in where and where.endswith(" tolist")
