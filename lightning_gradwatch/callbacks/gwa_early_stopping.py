"""Early stopping on gradient-weight alignment, without a validation set."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch import Tensor
from typing_extensions import override

from .gradient_weight_alignment import GradientWeightAlignment


class GWAEarlyStopping(EarlyStopping):
    """Stop training when the per-epoch GWA aggregate stops improving (mode ``max``).

    Training from scratch, the paper's rule is the epoch of maximal ``gwa/epoch``. With
    ``finetune=True`` the rule is the maximum *after the initial minimum* (fine-tuning first
    makes GWA fall, then rise): while the monitored value keeps reaching new minima nothing
    counts against patience, and the best value restarts from each new minimum.

    It checks at the end of every training epoch (GWA needs no validation loop), after asking
    every :class:`GradientWeightAlignment` callback to finish its epoch, so the order of the
    callbacks does not matter. The stop decision is synchronised across ranks as in
    ``EarlyStopping``. :attr:`best_epoch` is the selected epoch; restore its weights with
    ``ModelCheckpoint(monitor="gwa/epoch", mode="max", save_on_train_epoch_end=True)`` (from
    scratch; see ``docs/gwa.md`` for fine-tuning).

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.callbacks import ModelCheckpoint
        >>> from lightning_gradwatch import GradientWeightAlignment, GWAEarlyStopping
        >>> callbacks = [
        ...     GradientWeightAlignment(),
        ...     GWAEarlyStopping(patience=10, smoothing=0.5),
        ...     ModelCheckpoint(monitor="gwa/epoch", mode="max", save_on_train_epoch_end=True),
        ... ]
        >>> trainer = pl.Trainer(callbacks=callbacks)  # doctest: +SKIP

    Args:
        monitor: the metric, ``"gwa/epoch"`` by default (or ``"gwa/layer/<name>"``, ...).
        patience: epochs without improvement before stopping.
        min_delta: smallest increase that counts as an improvement.
        smoothing: exponential moving average factor in ``[0, 1)`` applied to the monitored
            value before the decision: ``s_t = smoothing * s_{t-1} + (1 - smoothing) * x_t``.
            ``0`` (default) is the paper's unsmoothed rule.
        finetune: use the fine-tuning rule (maximum after the initial minimum).
        verbose, strict, log_rank_zero_only: as in ``EarlyStopping``.

    Epochs whose value is not finite (e.g. all scores equal) are skipped with a warning.
    """

    _finalizes_gwa = True

    def __init__(
        self,
        monitor: str = "gwa/epoch",
        patience: int = 5,
        min_delta: float = 0.0,
        smoothing: float = 0.0,
        finetune: bool = False,
        verbose: bool = False,
        strict: bool = True,
        log_rank_zero_only: bool = False,
    ) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        super().__init__(
            monitor=monitor,
            min_delta=min_delta,
            patience=patience,
            verbose=verbose,
            mode="max",
            strict=strict,
            check_finite=False,
            check_on_train_epoch_end=True,
            log_rank_zero_only=log_rank_zero_only,
        )
        self.smoothing = smoothing
        self.finetune = finetune
        self.best_epoch: int | None = None
        self.smoothed: float | None = None
        self.running_min: float | None = None
        #: ``(epoch, raw value, smoothed value)`` of every checked epoch.
        self.values: list[tuple[int, float, float]] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            monitor=self.monitor, mode=self.mode, finetune=self.finetune
        )

    @override
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        pl_module = trainer.lightning_module
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, GradientWeightAlignment):
                callback.finalize_epoch(trainer, pl_module)
        logs = trainer.callback_metrics
        if trainer.fast_dev_run or not self._validate_condition_metric(logs):
            return
        raw = float(logs[self.monitor].squeeze())
        epoch = trainer.current_epoch
        should_stop, reason = False, None
        if not math.isfinite(raw):
            warnings.warn(
                f"GWAEarlyStopping: {self.monitor} = {raw} at epoch {epoch}; epoch skipped",
                stacklevel=2,
            )
        else:
            smoothed = (
                raw
                if self.smoothed is None
                else self.smoothing * self.smoothed + (1.0 - self.smoothing) * raw
            )
            self.smoothed = smoothed
            self.values.append((epoch, raw, smoothed))
            current = torch.tensor(smoothed, dtype=torch.float64)
            if self.finetune and (self.running_min is None or smoothed <= self.running_min):
                # Still descending: the new minimum is the first candidate of the rise.
                self.running_min = smoothed
                self.best_score = current
                self.wait_count = 0
                self.best_epoch = epoch
            else:
                should_stop, reason = self._evaluate_stopping_criteria(current)
                if self.wait_count == 0 and not should_stop:
                    self.best_epoch = epoch
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = epoch
            self.stopping_reason_message = reason
        if reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)

    @override
    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        self.best_score = self.best_score.to(torch.float64)
        return super()._evaluate_stopping_criteria(current)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            best_epoch=self.best_epoch,
            smoothed=self.smoothed,
            running_min=self.running_min,
            values=list(self.values),
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_epoch = state_dict.get("best_epoch")
        self.smoothed = state_dict.get("smoothed")
        self.running_min = state_dict.get("running_min")
        self.values = [tuple(v) for v in state_dict.get("values", [])]  # type: ignore[misc]
