"""CSV export of per-sample GWA scores: ``GradientWeightAlignment(write_scores=True)``."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from torch import Tensor

#: The directory, inside the logger's directory, that holds one file per epoch.
SCORES_DIR = "gwa_scores"


def scores_path(trainer: pl.Trainer, epoch: int) -> str:
    """``<log dir>/gwa_scores/epoch_XXXX.csv`` (the directory is created)."""
    directory = os.path.join(trainer.log_dir or trainer.default_root_dir, SCORES_DIR)
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f"epoch_{epoch:04d}.csv")


def write_epoch_scores(trainer: pl.Trainer, epoch: int, epoch_mean: Tensor) -> None:
    """Write the ``(N,)`` per-sample epoch means (NaN: not seen, left out) as ``index,score``
    rows, 9 significant digits."""
    seen = torch.nonzero(~torch.isnan(epoch_mean)).flatten()
    with open(scores_path(trainer, epoch), "w") as handle:
        handle.write("index,score\n")
        for index, score in zip(seen.tolist(), epoch_mean[seen].tolist(), strict=True):
            handle.write(f"{index},{score:.9g}\n")
