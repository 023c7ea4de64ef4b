"""Shared machinery for callbacks driven by a :class:`GradientProbe`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ..probe import GradientProbe, ProbeStats
from ..probe.probe import LossReduction


def lightning_loss_scale(trainer: pl.Trainer) -> float:
    """The factor Lightning multiplied the user's loss by before ``backward``.

    Automatic optimisation divides the loss by ``accumulate_grad_batches``; a 16-bit
    ``GradScaler`` multiplies it by its current scale. Manual optimisation leaves the loss as
    the user returns it.
    """
    scale = 1.0
    if trainer.lightning_module.automatic_optimization:
        scale /= trainer.accumulate_grad_batches
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        scale *= float(scaler.get_scale())
    return scale


class ProbeCallback(Callback):
    """Base class: attaches a probe on scheduled training batches and hands each backward's
    statistics to :meth:`on_probe_stats`.

    Subclasses choose the parameters (:meth:`probe_params`), the schedule
    (:meth:`should_probe`) and what to do with the statistics. Backward passes whose
    statistics are not finite (e.g. AMP overflow steps) are skipped and counted in
    :attr:`skipped_steps`.
    """

    def __init__(self, loss_reduction: LossReduction = "mean", sum_grad_squared: bool = False):
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(
                f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}: say how your "
                f"training_step reduces the per-sample losses"
            )
        self.loss_reduction: LossReduction = loss_reduction
        self.sum_grad_squared = sum_grad_squared
        self.probe: GradientProbe | None = None
        self.skipped_steps = 0
        self._batch: Any = None
        self._batch_idx = 0
        self._trainer: pl.Trainer | None = None

    # -- for subclasses --------------------------------------------------------------
    def probe_params(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str] | None:
        """Parameter names to track (``None``: all trainable). Called at ``setup``."""
        return None

    def should_probe(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        """Whether to attach the hooks for this training batch."""
        return True

    def on_probe_stats(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stats: ProbeStats,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Called after every probed backward pass with finite statistics."""

    # -- Lightning hooks -------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        self.probe = GradientProbe(
            pl_module,
            params=self.probe_params(trainer, pl_module),
            loss_reduction=self.loss_reduction,
            sum_grad_squared=self.sum_grad_squared,
            loss_scale=self._loss_scale,
        )

    def _loss_scale(self) -> float:
        assert self._trainer is not None
        return lightning_loss_scale(self._trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.probe is not None and self.should_probe(trainer, batch_idx):
            self._batch, self._batch_idx = batch, batch_idx
            self.probe.reset()
            self.probe.attach()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probe = self.probe
        if probe is None or not probe._active or not probe.has_stats:
            return
        stats = probe.stats
        probe.reset()
        if not stats.is_finite():
            self.on_probe_nonfinite(trainer, pl_module)
            return
        with torch.no_grad():
            self.on_probe_stats(trainer, pl_module, stats, self._batch, self._batch_idx)

    def on_probe_nonfinite(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called instead of :meth:`on_probe_stats` for a backward pass whose statistics hold
        NaN or Inf (an AMP overflow, a non-finite loss). Counts it in :attr:`skipped_steps`;
        subclasses that count optimizer steps rather than backward passes override this."""
        self.skipped_steps += 1

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.probe is not None:
            self.probe.detach()
        self._batch = None

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.probe is not None:
            self.probe.detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.probe is not None:
            self.probe.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
