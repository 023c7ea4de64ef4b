"""No host-device synchronisation from this package on non-logging training steps.

The callbacks keep finiteness checks, skip counts and loss-scale reads on the device until a
logging step. :func:`host_syncs.count_host_syncs` counts the converting ``Tensor`` calls whose
innermost frame outside ``torch`` is in ``lightning_gradwatch`` (Lightning's own reads are not
ours).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from host_syncs import count_host_syncs
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import (
    GradientSNR,
    GradientWeightAlignment,
    GWAEarlyStopping,
    IndexedDataset,
    SpectralNorms,
)


class _Classifier(pl.LightningModule):
    """A small MLP classifier; the batch is ``(x, y)`` or ``(x, y, dataset indices)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _CountOnSteps(pl.Callback):
    """Counts host syncs between ``on_train_batch_start`` of step ``first`` and
    ``on_train_batch_end`` of step ``last`` (inclusive); placed first and last in the list so
    the other callbacks' hooks for those steps fall inside."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.found: Counter[str] = Counter()
        self.counted_steps = 0
        self._active: Any = None

    def start(self) -> pl.Callback:
        outer = self

        class Start(pl.Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
                if outer.first <= trainer.global_step <= outer.last:
                    outer._active = count_host_syncs()
                    outer._counter = outer._active.__enter__()

        return Start()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._active is not None:
            self._active.__exit__(None, None, None)
            self.found.update(self._counter)
            self._active = None
            self.counted_steps += 1


@pytest.mark.parametrize("with_indices", [False, True])
def test_no_host_sync_on_non_logging_steps(with_indices: bool) -> None:
    """With dataset indices, GWA also records and checks per-sample scores every step."""
    torch.manual_seed(0)
    data: Any = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    if with_indices:
        data = IndexedDataset(data)
    loader = DataLoader(data, batch_size=16)  # 4 steps per epoch
    counter = _CountOnSteps(first=2, last=7)  # step 0/1 may do first-use checks
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        log_every_n_steps=1000,  # no counted step is a logging step
        callbacks=[
            counter.start(),
            GradientWeightAlignment(indices=-1 if with_indices else None),
            GWAEarlyStopping(),
            GradientSNR(),
            SpectralNorms(),
            counter,
        ],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=CSVLogger("logs"),
    )
    trainer.fit(_Classifier(), loader)
    assert counter.counted_steps == 6
    assert not counter.found, "host syncs from lightning_gradwatch on non-logging steps:\n" + (
        "\n".join(f"  {where} x{n}" for where, n in sorted(counter.found.items()))
    )


def test_counter_sees_package_calls_only() -> None:
    """The counter attributes a call to its caller: a sync written in this test module is not
    the package's, and torch's own internal conversions are skipped to the caller."""
    t = torch.ones(3)
    with count_host_syncs() as found:
        t.sum().item()
        bool(t.any())
        float(t[0])
    assert not found
    from lightning_gradwatch.probe import _linalg

    # a package frame that converts: call through a package function's globals
    code = compile("x.item()", _linalg.__file__, "eval")
    with count_host_syncs() as found:
        eval(code, {"__name__": _linalg.__name__, "x": t.sum()})
    (where,) = found
    assert where.startswith("lightning_gradwatch/") and where.endswith(" item")
