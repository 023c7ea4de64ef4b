"""Warnings about how GWA is wired into a Trainer, and what it reads from the Trainer and the
probe at setup."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import IterableDataset, Subset

from .. import keys
from .._lightning import epoch_end_flag, overrides

#: Every GWA key starts with this (headline and per-layer sections).
_GWA_PREFIXES = (f"{keys.GWA_FAMILY}/", f"{keys.GWA_FAMILY}{keys.LAYERS_SUFFIX}/")


def monitors_gwa(callback: Any) -> str | None:
    """The GWA key a callback monitors (``callback.monitor``), or ``None``."""
    monitor = getattr(callback, "monitor", None)
    return monitor if isinstance(monitor, str) and monitor.startswith(_GWA_PREFIXES) else None


def warn_if_stopper_comes_first(trainer: pl.Trainer, gwa: pl.Callback) -> None:
    """Warn when a Lightning ``EarlyStopping`` on a GWA key runs before the GWA callback: it
    would check each epoch before the epoch's GWA is logged."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if callback is gwa:
            break
        monitor = monitors_gwa(callback)
        if isinstance(callback, EarlyStopping) and monitor is not None:
            rank_zero_warn(
                f"{type(callback).__name__}(monitor={monitor!r}) comes before "
                f"GradientWeightAlignment in Trainer(callbacks=[...]), so it checks the "
                f"epoch before the epoch's GWA is logged. Put GradientWeightAlignment first, "
                f"or use GWAEarlyStopping."
            )


def warn_if_checked_at_validation(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Warn when an ``EarlyStopping``/``ModelCheckpoint`` monitoring a GWA key may act at the
    end of validation: validation runs before the training epoch ends, so it would rank each
    epoch by the previous epoch's GWA."""
    if not overrides("validation_step", pl_module):
        return
    every_epoch_end = trainer.check_val_every_n_epoch == 1 and trainer.val_check_interval == 1.0
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        monitor = monitors_gwa(callback)
        if monitor is None:
            continue
        if isinstance(callback, EarlyStopping):
            flag, value = "check_on_train_epoch_end", epoch_end_flag(callback)
        elif isinstance(callback, ModelCheckpoint):
            flag, value = "save_on_train_epoch_end", epoch_end_flag(callback)
        else:
            continue
        # Unset, both resolve to the training epoch end only when validation runs once at the
        # end of every epoch (Lightning's EarlyStopping.setup and ModelCheckpoint rules).
        if value is True or (value is None and every_epoch_end):
            continue
        rank_zero_warn(
            f"{type(callback).__name__}(monitor={monitor!r}) may act at the end of validation, "
            f"which runs before the training epoch's GWA is computed, so it would judge each "
            f"epoch by the previous epoch's value. Pass {type(callback).__name__}(..., "
            f"{flag}=True)."
        )


def dataset_length(trainer: pl.Trainer) -> int | None:
    """The number of dataset indices when Lightning has a single map-style training dataset,
    else None. A ``Subset`` keeps the indices of the dataset it selects from (a subset of an
    ``IndexedDataset`` yields the full dataset's indices), so the bound is that dataset's
    length."""
    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if dataset is None or isinstance(dataset, IterableDataset):
        return None
    try:
        return len(dataset)
    except TypeError:
        return None


def probe_exclusions(probe: Any) -> dict[str, str]:
    """Parameter name to the reason the probe left it out, known before any backward (when no
    backward produced statistics there is no ``ProbeStats.excluded`` to read it from)."""
    if probe is None:
        return {}
    return probe.excluded_params()
