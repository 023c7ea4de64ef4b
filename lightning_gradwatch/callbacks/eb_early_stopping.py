"""``EBEarlyStopping``: stop when the EB criterion, averaged over a window of steps, says the
gradient has become noise."""

from __future__ import annotations

import math
import sys
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from typing_extensions import override

from .. import keys
from .._lightning import EarlyStoppingReason, early_stopping_log_info, early_stopping_should_skip
from ..loggers import log_headline_step
from .gradient_snr import GradientSNR


class EBEarlyStopping(EarlyStopping):
    """Stops training when the EB criterion, averaged over a window of steps, exceeds a
    threshold (Mahsereci et al. 2017: above 0 the gradient is indistinguishable from noise).

    The per-step criterion is noisy, so a plain ``EarlyStopping`` on ``eb/criterion`` would
    stop on the first unlucky batch, and it only checks once per epoch. This subclass takes
    every value :class:`GradientSNR` computes (through its public
    :attr:`GradientSNR.last_computed`, also off logging steps), keeps the last ``window``
    finite ones, logs their mean as ``eb/criterion_window`` on logging steps, and stops (on
    every rank) as soon as a full window's mean is above ``threshold``. Patience-based
    stopping is disabled: only the threshold stops. Needs a :class:`GradientSNR` in the
    trainer's callbacks; the criterion is derived for plain SGD.

    Deciding to stop is a host decision, so each computed step's criterion is read on the host
    (one number). With ``GradientSNR``'s default schedule the computed steps are Lightning's
    logging steps, so the read falls on steps that synchronise anyway.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_gradwatch import EBEarlyStopping, GradientSNR
        >>> trainer = pl.Trainer(
        ...     callbacks=[GradientSNR(every_n_steps=1), EBEarlyStopping(window=20)],
        ...     log_every_n_steps=1,
        ... )

    Args:
        window: number of computed steps to average.
        threshold: stop when the window mean is above this.
        verbose: print a message when stopping.
    """

    def __init__(self, window: int = 20, threshold: float = 0.0, verbose: bool = False) -> None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        super().__init__(
            monitor=keys.EB_CRITERION_WINDOW,
            mode="max",
            stopping_threshold=threshold,
            patience=sys.maxsize,
            check_finite=False,
            verbose=verbose,
        )
        self.window = window
        self.threshold = float(threshold)
        #: The last ``window`` finite EB criteria of computed steps, oldest first.
        self.values: deque[float] = deque(maxlen=window)
        self._source: GradientSNR | None = None
        self._last_seen: int | None = None

    @property
    @override
    def state_key(self) -> str:
        # The monitor is fixed, so EarlyStopping's key would be the same for every instance.
        return self._generate_state_key(window=self.window, threshold=self.threshold)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        sources = [cb for cb in trainer.callbacks if isinstance(cb, GradientSNR)]  # type: ignore[attr-defined]
        if not sources:
            raise ValueError(
                "EBEarlyStopping needs a GradientSNR callback to compute the EB criterion: "
                "pass callbacks=[GradientSNR(...), EBEarlyStopping(...)] to the Trainer"
            )
        self._source = sources[0]

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        computed = self._source.last_computed if self._source is not None else None
        if computed is None or computed.step == self._last_seen:
            return
        self._last_seen = computed.step
        value = computed.values[keys.EB_CRITERION]
        # One host read per computed step: the criterion, NaN when the step was skipped.
        read = float(torch.where(computed.valid, value, torch.full_like(value, math.nan)))
        if math.isfinite(read):
            self.values.append(read)
        if len(self.values) < self.window:
            return
        mean = sum(self.values) / len(self.values)
        log_headline_step(pl_module, {self.monitor: torch.tensor(mean, dtype=torch.float64)})
        should_stop = mean > self.threshold
        # Every rank sees the same global statistics; reduce anyway so ranks never disagree.
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        if (
            should_stop
            and not trainer.should_stop
            and not early_stopping_should_skip(self, trainer)
        ):
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            reason = (
                f"EB criterion averaged over the last {self.window} computed steps is "
                f"{mean:.4f} > {self.threshold}: the gradient is indistinguishable from noise."
            )
            if EarlyStoppingReason is not None:
                self.stopping_reason = EarlyStoppingReason.STOPPING_THRESHOLD
            self.stopping_reason_message = reason
            if self.verbose:
                early_stopping_log_info(self, trainer, reason)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The check runs per step in ``on_train_batch_end``."""

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The check runs per step in ``on_train_batch_end``."""

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["eb_values"] = list(self.values)
        state["last_seen"] = self._last_seen
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.values = deque(state_dict.get("eb_values", []), maxlen=self.window)
        self._last_seen = state_dict.get("last_seen")
