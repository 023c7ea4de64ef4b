"""``GradientSNR``: GSNR, gradient noise scale, coherence and the EB criterion per step.

``EBEarlyStopping`` stops training on a windowed mean of the EB criterion.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections import deque
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch import Tensor
from typing_extensions import override

from .._lightning import (
    EarlyStoppingReason,
    batches_that_stepped,
    early_stopping_log_info,
    early_stopping_should_skip,
)
from ..functional import noise as F
from ..loggers import add_custom_scalars, is_logging_step, log_scalars_batch, warn_if_no_logger
from ..metrics.noise import GradientNoiseSums, RatioEMA
from ..probe import ProbeStats
from ._probe_callback import LossReductionSetting, ProbeCallback


def optimizer_steps_done(trainer: pl.Trainer) -> int:
    """Optimizer steps completed so far: the counter Lightning's logging schedule uses.

    Lightning writes step metrics when ``(_batches_that_stepped + 1) % log_every_n_steps == 0``
    (``LoggerConnector.should_update_logs``); the counter is constant over the micro-batches
    of one optimizer step.
    """
    return batches_that_stepped(trainer)


#: Logged through ``pl_module.log``; the auxiliary and per-layer values go in one batch.
_HEADLINE_KEYS = (
    "gsnr/mean",
    "gsnr/noise_scale",
    "gsnr/noise_scale_smoothed",
    "gsnr/coherence",
    "gsnr/eb_criterion",
)


class GradientSNR(ProbeCallback):
    """Logs the gradient signal-to-noise ratio and its relatives from exact per-sample sums.

    On scheduled optimizer steps the probe's hooks are attached for every micro-batch of the
    step; the per-sample sums ``sum_i g_i``, ``sum_i g_i**2`` (per entry) and
    ``sum_i |g_i|^2`` (per layer) are accumulated over the micro-batches, all-reduced over DDP
    ranks, and turned into statistics of the effective global batch just before the optimizer
    step. On other steps no hook is attached.

    Logged (``pl_module.log``, ``on_step=True``):

    - ``gsnr/mean``: mean GSNR ``mean_i(g)^2 / var_i(g)`` over all tracked entries;
      ``gsnr/layer/<param>`` the same per parameter tensor.
    - ``gsnr/noise_scale``: ``B_simple = tr(Sigma) / |G|^2``; ``gsnr/noise_scale_smoothed``
      the ratio of EMAs of numerator and denominator; ``gsnr/trace_sigma`` and
      ``gsnr/grad_sq_norm`` the two estimates themselves.
    - ``gsnr/coherence``: ``|sum g_i|^2 / (B sum |g_i|^2)``; ``gsnr/coherence/<param>`` per
      parameter tensor.
    - ``gsnr/eb_criterion``: Mahsereci et al.'s EB criterion; above 0 means the batch gradient
      is indistinguishable from noise.
    - ``gsnr/batch_size``: the effective global batch ``B`` the statistics describe.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_gradwatch import GradientSNR
        >>> trainer = pl.Trainer(callbacks=[GradientSNR()], log_every_n_steps=10)

    Args:
        every_n_steps: compute every this many optimizer steps; ``None`` follows the
            trainer's ``log_every_n_steps`` (and computes nothing when it is 0). Values
            computed off Lightning's logging steps still reach ``trainer.callback_metrics``
            (so ``EarlyStopping`` sees them) but loggers write only on logging steps.
        params: a parameter name or names to include (``None``: every trainable parameter).
        loss_reduction: how ``training_step`` reduces the per-sample losses: ``"auto"``
            measures it on the first training batch (automatic optimisation); ``"mean"`` or
            ``"sum"`` declare it (checked the same way; required with manual optimisation).
            Only ``gsnr/trace_sigma``, ``gsnr/grad_sq_norm`` and the noise scale's parts
            depend on it; a loss that is neither is refused at the first batch.
        eps: ``0`` leaves zero-variance entries out of the GSNR and EB means; ``> 0`` keeps
            every entry and adds ``eps`` to the variance (Cockpit's ``MeanGSNR`` convention).
        zero_variance_rtol: an entry counts as zero-variance when its variance is at most this
            fraction of its mean square; ``None`` uses ``64 * finfo(dtype).eps``.
        noise_scale_decay: EMA decay for ``gsnr/noise_scale_smoothed``, in ``[0, 1)``.
        per_layer: also log the per-parameter ``gsnr/layer/*`` and ``gsnr/coherence/*``
            (through ``pl_module.log`` on Lightning's logging steps only; always in
            :attr:`latest`). Each costs two ``pl_module.log`` calls per parameter tensor.
        backward: with several backward passes per training batch (manual optimisation, e.g.
            a GAN), the 0-based index of the one to use; ``None`` (default): the only one that
            reaches the tracked parameters (a second one raises ``RuntimeError``).

    Raises:
        ValueError: bad ``every_n_steps``, ``eps``, ``noise_scale_decay``; at ``setup``,
            unknown parameter names, no parameter to track, or ``loss_reduction="auto"``
            with manual optimisation; at the first training batch, a loss that is neither a
            mean nor a sum over samples, or one that contradicts a declared
            ``loss_reduction``.

    Overflow steps (a ``GradScaler`` skipping ``optimizer.step``, a non-finite loss) are
    skipped, counted once per step in ``skipped_steps`` and logged as
    ``gradwatch/skipped_steps`` on logging steps; nothing of theirs enters any state.
    """

    # gsnr/trace_sigma and gsnr/grad_sq_norm scale with the loss reduction factor c squared.
    needs_loss_scale = True

    def __init__(
        self,
        every_n_steps: int | None = None,
        params: str | Sequence[str] | None = None,
        loss_reduction: LossReductionSetting = "auto",
        eps: float = 0.0,
        zero_variance_rtol: float | None = None,
        noise_scale_decay: float = 0.9,
        per_layer: bool = True,
        backward: int | None = None,
    ) -> None:
        super().__init__(loss_reduction=loss_reduction, sum_grad_squared=True, backward=backward)
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(
                f"every_n_steps must be a positive int or None (follow log_every_n_steps), "
                f"got {every_n_steps!r}"
            )
        if eps < 0:
            raise ValueError(f"eps must be >= 0 (0 leaves zero-variance entries out), got {eps}")
        self.every_n_steps = every_n_steps
        if isinstance(params, str):  # one name, not an iterable of its characters
            params = [params]
        self.params = list(params) if params is not None else None
        self.eps = float(eps)
        self.zero_variance_rtol = zero_variance_rtol
        self.per_layer = per_layer
        self.noise_scale_ema = RatioEMA(noise_scale_decay)
        #: The per-step sums, allocated at the first probed batch (after Lightning has cast the
        #: model to its precision) in the parameters' dtype, at least float32.
        self.sums: GradientNoiseSums | None = None
        self._layer_sizes: dict[str, int] = {}
        #: The quantities of the last computed step, as logged (``name -> 0-dim tensor``).
        self.latest: dict[str, Tensor] = {}
        #: ``optimizer_steps_done`` at the last computed step (``None`` before the first).
        self.latest_step: int | None = None
        self._sums_step: int | None = None
        self._warned_small_batch = False
        self._warned_partial: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        # Two instances tracking different parameters or schedules keep separate entries.
        return self._generate_state_key(
            params=self.params, every_n_steps=self.every_n_steps, backward=self.backward
        )

    # -- ProbeCallback interface ---------------------------------------------------------
    @override
    def probe_params(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str] | None:
        return self.params

    @override
    def should_probe(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        interval = self.every_n_steps or trainer.log_every_n_steps
        if interval <= 0:
            return False
        return (optimizer_steps_done(trainer) + 1) % interval == 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.probe is None:
            return
        named = dict(pl_module.named_parameters())
        names = self.probe.param_names
        if not names:
            raise ValueError(
                "GradientSNR found no trainable parameter to track: pass params=[...] with "
                "names from model.named_parameters() that require grad"
            )
        self._layer_sizes = {n: named[n].numel() for n in names}
        self.sums = None
        warn_if_no_logger(trainer, "GradientSNR")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        add_custom_scalars(
            trainer,
            "gradient noise",
            {
                "noise scale (raw, smoothed) and batch size": [
                    r"gsnr/noise_scale.*",
                    r"gsnr/batch_size",
                ],
                "GSNR per layer": [r"gsnr/layer/.*", r"gsnr/mean"],
                "coherence per layer": [r"gsnr/coherence.*"],
                "EB criterion": [r"gsnr/eb_criterion.*"],
            },
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        step = optimizer_steps_done(trainer)
        attached = self.probe is not None and self.probe._active
        if attached and self._sums_step != step:
            # First micro-batch of a scheduled optimizer step.
            self._sums_step = step
            self._prepare_sums(pl_module)

    def _prepare_sums(self, pl_module: pl.LightningModule) -> None:
        """Zeroed sums on the module's device, in the tracked parameters' dtype or wider.

        Allocated here rather than at ``setup``: Lightning casts the model to its precision
        (e.g. ``precision="64-true"`` on a model built in float32) after ``setup``, and sums
        kept in the pre-cast dtype would lose the digits the precision was chosen for.
        """
        named = dict(pl_module.named_parameters())
        dtype = torch.float32
        for name in self._layer_sizes:
            dtype = torch.promote_types(dtype, named[name].dtype)
        if self.sums is None or self.sums.grad_sum.dtype != dtype:
            self.sums = GradientNoiseSums(self._layer_sizes, dtype=dtype)
        else:
            self.sums.reset()
        self.sums.to(pl_module.device)

    @override
    def on_probe_nonfinite(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Counted once per optimizer step, when the step's sums are consumed.
        if self.sums is not None:
            self.sums.update({}, {}, {}, 0, finite=False)

    @override
    def on_probe_stats(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stats: ProbeStats,
        batch: Any,
        batch_idx: int,
    ) -> None:
        assert self.sums is not None
        self.sums.update(stats.grad_sum, stats.sum_sq, stats.sq_norm, stats.batch_size)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        step = optimizer_steps_done(trainer)
        logging_step = is_logging_step(trainer)
        values = None
        if self.sums is not None and self._sums_step == step:
            self._sums_step = None  # consumed: a second optimizer in this step computes nothing
            values = self._step_quantities(trainer, optimizer)
        if logging_step:
            # On every logging step, computed or not, so a logger shows when steps are skipped.
            log_scalars_batch(trainer, {"gradwatch/skipped_steps": float(self.skipped_steps)})
        if values is None:
            return
        self.latest, self.latest_step = values, step
        # The model-level values go through pl_module.log. Each call costs about half a
        # millisecond of Lightning bookkeeping, so the per-layer values are written in one
        # batch (as LearningRateMonitor does), and only on steps the loggers write; they still
        # reach trainer.callback_metrics for monitoring.
        for name in _HEADLINE_KEYS:
            value = values[name]
            if not torch.isnan(value):
                pl_module.log(name, value, on_step=True, on_epoch=False, sync_dist=False)
        if logging_step:
            log_scalars_batch(trainer, {n: v for n, v in values.items() if n not in _HEADLINE_KEYS})

    # -- computation -----------------------------------------------------------------
    def _step_quantities(self, trainer: pl.Trainer, optimizer: Any) -> dict[str, Tensor] | None:
        """The step's statistics, or ``None`` for a step that is skipped (counted in
        :attr:`skipped_steps` when it overflowed)."""
        assert self.sums is not None
        # Collective on every rank (all ranks share the schedule): one all-reduce per state.
        sums = self.sums.compute()
        self.sums.reset()
        nonfinite = sums.nonfinite
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # The GradScaler skips optimizer.step when any gradient is non-finite after
            # unscaling (done before this hook). The probe's statistics, formed in float32 from
            # the 16-bit backprops, can stay finite on such a step while the 16-bit batch
            # gradient overflowed: apply the scaler's own criterion so the step is skipped here
            # too. The flag stays on the device and is read with the count below.
            grads = [
                p.grad
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None
            ]
            if grads:
                finite = torch.stack([g.isfinite().all() for g in grads]).all()
                nonfinite = nonfinite + (~finite).to(nonfinite.dtype)
        # One device-to-host read per computed step: whether it overflowed, and its batch size.
        nonfinite_count, count = torch.stack([nonfinite.to(sums.count.device), sums.count]).tolist()
        if nonfinite_count > 0:
            # An overflow step (or a non-finite loss): none of its values enter any state.
            self.skipped_steps += 1
            return None
        with torch.no_grad():
            return self._quantities(sums, count)

    def _quantities(self, sums: Any, count: int) -> dict[str, Tensor] | None:
        if count == 0:
            return None  # no probed backward this step (e.g. training_step returned None)
        if count < 2:
            if not self._warned_small_batch:
                self._warned_small_batch = True
                warnings.warn(
                    f"GradientSNR: the effective batch has {count} sample(s); variance, GSNR, "
                    f"noise scale and the EB criterion need at least 2, so these steps are "
                    f"skipped. Use a batch size >= 2 (or accumulate_grad_batches >= 2).",
                    stacklevel=2,
                )
            return None
        assert self.sums is not None
        # torchmetrics squeezes one-element results: one tracked layer gives a 0-dim count
        complete = (sums.layer_count.reshape(-1) == count).tolist()
        names = [n for n, ok in zip(self.sums.layer_names, complete, strict=True) if ok]
        for name, ok in zip(self.sums.layer_names, complete, strict=True):
            if not ok and name not in self._warned_partial:
                self._warned_partial.add(name)
                warnings.warn(
                    f"GradientSNR: parameter '{name}' had no per-sample statistics for part of "
                    f"the batch (see the probe's warning for why) and is left out of the "
                    f"noise statistics on such steps.",
                    stacklevel=2,
                )
        if not names:
            return None
        slices = [self.sums.layer_slice(n) for n in names]
        index = [self.sums.layer_names.index(n) for n in names]
        if len(names) == len(self.sums.layer_names):
            grad_sum, grad_sq_sum = sums.grad_sum, sums.grad_sq_sum
            sample_sq_norm_sum = sums.sample_sq_norm_sum
        else:
            grad_sum = torch.cat([sums.grad_sum[s] for s in slices])
            grad_sq_sum = torch.cat([sums.grad_sq_sum[s] for s in slices])
            sample_sq_norm_sum = sums.sample_sq_norm_sum[index]
        stats = F.noise_statistics(
            grad_sum,
            grad_sq_sum,
            sample_sq_norm_sum,
            count,
            [s.stop - s.start for s in slices],
            eps=self.eps,
            zero_variance_rtol=self.zero_variance_rtol,
        )
        self.noise_scale_ema.update(stats["trace_sigma"], stats["grad_sq_norm"])
        values: dict[str, Tensor] = {
            "gsnr/mean": stats["gsnr_mean"],
            "gsnr/noise_scale": stats["noise_scale"],
            "gsnr/noise_scale_smoothed": self.noise_scale_ema.compute().to(grad_sum.dtype),
            "gsnr/trace_sigma": stats["trace_sigma"],
            "gsnr/grad_sq_norm": stats["grad_sq_norm"],
            "gsnr/coherence": stats["coherence"],
            "gsnr/eb_criterion": stats["eb_criterion"],
            "gsnr/batch_size": torch.tensor(float(count)),
        }
        if self.per_layer:
            for k, name in enumerate(names):
                values[f"gsnr/layer/{name}"] = stats["layer_gsnr"][k]
                values[f"gsnr/coherence/{name}"] = stats["layer_coherence"][k]
        return values

    # -- state -------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        ema = self.noise_scale_ema
        state["noise_scale_ema"] = {
            "numerator": float(ema.numerator),
            "denominator": float(ema.denominator),
            "updates": int(ema.updates),
        }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("noise_scale_ema")
        if saved is not None:
            ema = self.noise_scale_ema
            ema.numerator = torch.tensor(saved["numerator"], dtype=torch.float64)
            ema.denominator = torch.tensor(saved["denominator"], dtype=torch.float64)
            ema.updates = torch.tensor(saved["updates"], dtype=torch.long)


class EBEarlyStopping(EarlyStopping):
    """Stops training when the EB criterion, averaged over a window of steps, exceeds a
    threshold (Mahsereci et al. 2017: above 0 the gradient is indistinguishable from noise).

    The per-step criterion is noisy, so a plain ``EarlyStopping`` on ``gsnr/eb_criterion``
    would stop on the first unlucky batch, and it only checks once per epoch. This subclass
    reads every value :class:`GradientSNR` computes, keeps the last ``window`` of them, logs
    their mean as ``gsnr/eb_criterion_window``, and stops (on every rank) as soon as a full
    window's mean is above ``threshold``. Patience-based stopping is disabled: only the
    threshold stops. Needs a :class:`GradientSNR` in the trainer's callbacks; the criterion
    is derived for plain SGD.

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
            monitor="gsnr/eb_criterion_window",
            mode="max",
            stopping_threshold=threshold,
            patience=sys.maxsize,
            check_finite=False,
            verbose=verbose,
        )
        self.window = window
        self.threshold = float(threshold)
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
        source = self._source
        if source is None or source.latest_step is None or source.latest_step == self._last_seen:
            return
        self._last_seen = source.latest_step
        value = float(source.latest["gsnr/eb_criterion"])
        if math.isfinite(value):
            self.values.append(value)
        if len(self.values) < self.window:
            return
        mean = sum(self.values) / len(self.values)
        pl_module.log(
            self.monitor, torch.tensor(mean, dtype=torch.float64), on_step=True, on_epoch=False
        )
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
