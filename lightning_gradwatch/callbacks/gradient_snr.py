"""``GradientSNR``: GSNR, gradient noise scale, coherence and the EB criterion per step.

The statistics of a computed step stay on the device: whether the step is usable (finite,
at least two samples, some layer complete) is a device flag that gates every state update
with ``torch.where``, and it is read on the host only on Lightning's logging steps, at epoch
ends, or when a user reads :attr:`GradientSNR.latest`. ``EBEarlyStopping`` (in
``eb_early_stopping.py``) reads each computed step through :attr:`GradientSNR.last_computed`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from .. import keys
from .._lightning import active_grad_scaler, batches_that_stepped
from ..functional import noise as F
from ..loggers import (
    add_custom_scalars,
    is_logging_step,
    log_headline_step,
    log_histogram_raw,
    log_scalars_batch,
    warn_if_no_logger,
)
from ..metrics.noise import GradientNoiseSums, NoiseSums, RatioEMA
from ..probe import ProbeStats
from ._probe_callback import LossReductionSetting, ProbeCallback


def optimizer_steps_done(trainer: pl.Trainer) -> int:
    """Optimizer steps completed so far: the counter Lightning's logging schedule uses.

    Lightning writes step metrics when ``(_batches_that_stepped + 1) % log_every_n_steps == 0``
    (``LoggerConnector.should_update_logs``); the counter is constant over the micro-batches
    of one optimizer step.
    """
    return batches_that_stepped(trainer)


#: The model-level values of a computed step, in the order of the device vector.
HEADLINE_KEYS: tuple[str, ...] = (
    keys.GSNR_MEAN,
    keys.NOISE_SCALE,
    keys.NOISE_SCALE_SMOOTHED,
    keys.NOISE_TRACE_SIGMA,
    keys.NOISE_GRAD_SQ_NORM,
    keys.GSNR_COHERENCE,
    keys.EB_CRITERION,
    keys.BATCH_SIZE,
)
#: Per-layer quantities (``gsnr_layers/<quantity>/<param>``), after the headline in the vector.
LAYER_QUANTITIES: tuple[str, ...] = ("gsnr", "coherence")


class ComputedStep(NamedTuple):
    """The statistics of one computed optimizer step, as :class:`GradientSNR` left them on the
    device (nothing here has been read by the host).

    Attributes:
        step: the optimizer step (``optimizer_steps_done``) the statistics describe.
        values: headline key (``keys.GSNR_MEAN``, ``keys.EB_CRITERION``, ...) -> ``()`` tensor.
        valid: ``()`` bool tensor; ``False`` when the step was skipped (non-finite gradients,
            fewer than 2 samples, or no layer with statistics for every sample), and the values
            are then meaningless.
    """

    step: int
    values: Mapping[str, Tensor]
    valid: Tensor


class _DeviceState(NamedTuple):
    """Device-side bookkeeping, read on the host only at logging steps and epoch ends."""

    latest: Tensor  # (V,) values of the last valid step (NaN before the first)
    latest_complete: Tensor  # (L,) bool: layers with statistics in that step
    latest_step: Tensor  # () long, -1 before the first valid step
    skipped: Tensor  # () long, non-finite optimizer steps since the last read
    small: Tensor  # () bool, a step with 1 sample since the last read
    partial: Tensor  # (L,) bool, layers that missed samples since the last read


class GradientSNR(ProbeCallback):
    """Logs the gradient signal-to-noise ratio and its relatives from exact per-sample sums.

    On scheduled optimizer steps the probe's hooks are attached for every micro-batch of the
    step; the per-sample sums ``sum_i g_i``, ``sum_i g_i**2`` (per entry) and
    ``sum_i |g_i|^2`` (per layer) are accumulated over the micro-batches, all-reduced over DDP
    ranks, and turned into statistics of the effective global batch just before the optimizer
    step. On other steps no hook is attached.

    Logged on Lightning's logging steps (names from :mod:`lightning_gradwatch.keys`):

    - ``gsnr/mean``: mean GSNR ``mean_i(g)^2 / var_i(g)`` over all tracked entries;
      ``gsnr_layers/gsnr/<param>`` the same per parameter tensor.
    - ``noise_scale/simple``: ``B_simple = tr(Sigma) / |G|^2``; ``noise_scale/smoothed``
      the ratio of EMAs of numerator and denominator; ``noise_scale/trace_sigma`` and
      ``noise_scale/grad_sq_norm`` the two estimates themselves.
    - ``gsnr/coherence``: ``|sum g_i|^2 / (B sum |g_i|^2)``; ``gsnr_layers/coherence/<param>``
      per parameter tensor.
    - ``eb/criterion``: Mahsereci et al.'s EB criterion; above 0 means the batch gradient
      is indistinguishable from noise.
    - ``gradwatch/batch_size``: the effective global batch ``B`` the statistics describe;
      ``gradwatch/skipped_steps``: steps skipped so far.
    - TensorBoard histograms ``gsnr/gsnr_layers`` and ``gsnr/coherence_layers``: the per-layer
      values of the step in one chart each (with two or more layers).

    Model-level values go through ``pl_module.log`` (monitorable by ``EarlyStopping`` and
    ``ModelCheckpoint``); per-layer values go to the loggers in one batch and into
    ``trainer.callback_metrics``. Steps computed off Lightning's logging steps
    (``every_n_steps`` smaller than ``log_every_n_steps``) update the smoothed noise scale and
    feed :class:`EBEarlyStopping` through :attr:`last_computed`, without any host-device
    synchronisation; they are not written.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_gradwatch import GradientSNR
        >>> trainer = pl.Trainer(callbacks=[GradientSNR()], log_every_n_steps=10)

    Args:
        every_n_steps: compute every this many optimizer steps; ``None`` follows the
            trainer's ``log_every_n_steps`` (and computes nothing when it is 0).
        params: a parameter name or names to include (``None``: every trainable parameter).
        loss_reduction: how ``training_step`` reduces the per-sample losses: ``"auto"``
            measures it on the first training batch (automatic optimisation); ``"mean"`` or
            ``"sum"`` declare it (checked the same way; required with manual optimisation).
            Only ``noise_scale/trace_sigma``, ``noise_scale/grad_sq_norm`` and the noise
            scale's parts depend on it; a loss that is neither is refused at the first batch.
        eps: ``0`` leaves zero-variance entries out of the GSNR and EB means; ``> 0`` keeps
            every entry and adds ``eps`` to the variance (Cockpit's ``MeanGSNR`` convention).
        zero_variance_rtol: an entry counts as zero-variance when its variance is at most this
            fraction of its mean square; ``None`` uses ``64 * finfo(dtype).eps``.
        noise_scale_decay: EMA decay for ``noise_scale/smoothed``, in ``[0, 1)``.
        per_layer: also log the per-parameter ``gsnr_layers/*`` values and histograms
            (always in :attr:`latest`).
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

    # noise_scale/trace_sigma and noise_scale/grad_sq_norm scale with the loss reduction
    # factor c squared.
    needs_loss_scale = True

    #: Non-finite backward passes are counted on the device (see GradientNoiseSums), so no
    #: step reads their finiteness to the host.
    handles_nonfinite = True

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
        # Before the base __init__, which sets skipped_steps (a property here).
        self._skipped_host = 0
        self._device_state: _DeviceState | None = None
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
        # noise_statistics' scratch tensors, kept between steps (no per-step allocation)
        self._workspace: list[Any] = []
        self._last_computed: ComputedStep | None = None
        self._last_vector: Tensor | None = None
        # Resolved on the host by _resolve(): the last valid step's values and step.
        self._latest: dict[str, Tensor] = {}
        # The same step's per-layer values as Python floats, for the loggers and histograms
        # (read to the host once, in _resolve: no tensor op per value).
        self._latest_layers: dict[str, float] = {}
        self._latest_step: int | None = None
        self._sums_step: int | None = None
        self._warned_small_batch = False
        self._warned_partial: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        # Two instances tracking different parameters or schedules keep separate entries.
        # Lightning reads it around every hook call (profiler labels): built once per value of
        # the settings (params compared by value, so a list changed in place gives a new key).
        settings = (
            tuple(self.params) if self.params is not None else None,
            self.every_n_steps,
            self.backward,
        )
        cached = self.__dict__.get("_state_key_cache")
        if cached is None or cached[0] != settings:
            key = self._generate_state_key(
                params=self.params, every_n_steps=self.every_n_steps, backward=self.backward
            )
            cached = self._state_key_cache = (settings, key)
        return cached[1]

    # -- public read-outs --------------------------------------------------------------
    @property
    def last_computed(self) -> ComputedStep | None:
        """The most recent computed step's statistics, still on the device (no
        synchronisation): the one public way for other callbacks to consume every computed
        step, as :class:`EBEarlyStopping` does. ``None`` before the first computed step."""
        return self._last_computed

    @property
    def latest(self) -> dict[str, Tensor]:
        """The values of the last computed step that was not skipped, by key (headline keys and,
        with ``per_layer``, ``gsnr_layers/*``); ``{}`` before the first. Reading it waits for
        the device."""
        self._resolve()
        return self._latest

    @property
    def latest_step(self) -> int | None:
        """``optimizer_steps_done`` at the step :attr:`latest` describes (``None`` before the
        first). Reading it waits for the device."""
        self._resolve()
        return self._latest_step

    @property  # type: ignore[override]
    def skipped_steps(self) -> int:
        """Optimizer steps skipped because their gradients were not finite. Reading it waits
        for the device."""
        state = self._device_state
        if state is None:
            return self._skipped_host
        return self._skipped_host + int(state.skipped)

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_host = int(value)
        if self._device_state is not None:
            self._device_state = self._device_state._replace(
                skipped=torch.zeros_like(self._device_state.skipped)
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
        self._workspace = []
        warn_if_no_logger(trainer, "GradientSNR")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def exact(key: str) -> str:
            return re.escape(key) + "$"

        add_custom_scalars(
            trainer,
            "gradient noise",
            {
                "noise scale (raw, smoothed) and batch size": [
                    exact(keys.NOISE_SCALE),
                    exact(keys.NOISE_SCALE_SMOOTHED),
                    exact(keys.BATCH_SIZE),
                ],
                "GSNR per layer": [
                    keys.layer_pattern(keys.GSNR_FAMILY, "gsnr"),
                    exact(keys.GSNR_MEAN),
                ],
                "coherence per layer": [
                    keys.layer_pattern(keys.GSNR_FAMILY, "coherence"),
                    exact(keys.GSNR_COHERENCE),
                ],
                "EB criterion": [exact(keys.EB_CRITERION), exact(keys.EB_CRITERION_WINDOW)],
            },
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        step = optimizer_steps_done(trainer)
        probe = self.probe
        attached = probe is not None and probe.active
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
            self.sums.restart()  # the step's first update overwrites the stale sums
        if self.sums.device != pl_module.device:
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
        # The pass's finiteness stays on the device; a non-finite one makes the step invalid.
        self.sums.update(
            stats.grad_sum, stats.sum_sq, stats.sq_norm, stats.batch_size, finite=stats.finite
        )

    @override
    def count_nonfinite(self, stats: ProbeStats) -> None:
        # Skips are counted per optimizer step, when the step's sums are consumed.
        pass

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        step = optimizer_steps_done(trainer)
        computed = False
        if self.sums is not None and self._sums_step == step:
            self._sums_step = None  # consumed: a second optimizer in this step computes nothing
            with torch.no_grad():
                computed = self._compute_step(trainer, optimizer, step)
        if not is_logging_step(trainer):
            return  # nothing is read on the host until the next logging step
        self._resolve()
        # On every logging step, computed or not, so a logger shows when steps are skipped.
        headline: dict[str, Tensor] = {
            keys.SKIPPED_STEPS: torch.tensor(float(self._skipped_host), dtype=torch.float64)
        }
        written = computed and self._latest_step == step
        if written:
            headline.update({k: self._latest[k] for k in HEADLINE_KEYS})
            # Per-layer values in one batched write (mirrored into callback_metrics).
            if self._latest_layers:
                log_scalars_batch(trainer, self._latest_layers)  # type: ignore[arg-type]
        # Model-level values through pl_module.log, monitorable like any logged metric.
        log_headline_step(pl_module, headline)
        if written:
            self._log_histograms(trainer)

    def _log_histograms(self, trainer: pl.Trainer) -> None:
        """The resolved step's per-layer values in one histogram per quantity."""
        if not self.per_layer or len(self._layer_sizes) < 2:
            return
        step = batches_that_stepped(trainer)
        for quantity in LAYER_QUANTITIES:
            prefix = keys.layer_key(keys.GSNR_FAMILY, quantity, "")
            # Host floats (a handful per step): plain Python costs less than a tensor op each.
            layers = self._latest_layers.items()
            values = [v for k, v in layers if k.startswith(prefix) and math.isfinite(v)]
            if not values:
                continue
            # Bins formed here, one per layer over the values' range: TensorBoard's own
            # binning of raw values (about 1500 exponential buckets) costs several times more.
            edges, counts = _layer_bins(values)
            log_histogram_raw(
                trainer,
                keys.layers_histogram_key(keys.GSNR_FAMILY, quantity),
                edges,
                counts,
                math.fsum(values),
                math.fsum(v * v for v in values),
                step,
            )

    # -- computation -----------------------------------------------------------------
    def _compute_step(self, trainer: pl.Trainer, optimizer: Any, step: int) -> bool:
        """Form the step's statistics on the device; whether there was a step to compute.

        Nothing here waits for the device: a step that must be skipped (non-finite, fewer than
        2 samples, no complete layer) is flagged on the device, and the flag gates the EMA and
        the latest values with ``torch.where``.
        """
        assert self.sums is not None
        # Collective on every rank (all ranks share the schedule): one all-reduce per state.
        sums = self.sums.synced()
        device = sums.grad_sum.device
        finite = sums.nonfinite.reshape(()).to(device) == 0
        if active_grad_scaler(trainer) is not None:
            # The GradScaler skips optimizer.step when any gradient is non-finite after
            # unscaling (done before this hook). The probe's statistics, formed in float32 from
            # the 16-bit backprops, can stay finite on such a step while the 16-bit batch
            # gradient overflowed: apply the scaler's own criterion so the step is skipped here
            # too.
            grads = [
                p.grad
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None
            ]
            if grads:
                finite = finite & torch.stack([g.isfinite().all() for g in grads]).all().to(device)
        vector, complete, enough, count = self._statistics(sums)
        # The (D,) sums served as scratch space (on one process they are the states
        # themselves): restart marks them stale, so they read as zero until the next step's
        # first update overwrites them, and no pass zeroes them here.
        self.sums.restart()
        valid = finite & enough & complete.any()
        self._update_ema_and_state(vector, complete, valid, finite, count, step)
        return True

    def _statistics(self, sums: NoiseSums) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(vector, complete, enough, count)``: the step's values in :data:`HEADLINE_KEYS`
        order then per layer; which layers had every sample; whether ``B >= 2``; ``B``.

        Layers that missed samples are left out exactly: their sums are zeroed, which makes
        every one of their entries zero-variance (left out with ``eps == 0``) and removes their
        share of ``N`` and ``|gbar|^2``; with ``eps > 0`` the entry counts are corrected.
        """
        assert self.sums is not None
        dtype = sums.grad_sum.dtype
        count = sums.count.reshape(()).to(dtype)
        # torchmetrics squeezes one-element results: one tracked layer gives a 0-dim count
        complete = sums.layer_count.reshape(-1).to(dtype) == count
        all_complete = complete.all()
        stats = F.noise_statistics(
            sums.grad_sum,
            sums.grad_sq_sum,
            sums.sample_sq_norm_sum.reshape(-1),
            count,
            self.sums.layer_sizes,
            eps=self.eps,
            zero_variance_rtol=self.zero_variance_rtol,
            complete=complete,
            workspace=self._workspace,
            consume=True,  # nothing reads the step's (D,) sums afterwards
        )
        gsnr, eb = stats["gsnr_mean"], stats["eb_criterion"]
        if self.eps > 0:
            # noise_statistics divides by every entry when eps > 0; the zeroed layers' ratios
            # are 0, so rescale the means to the complete layers' entries (a no-op, exactly,
            # when every layer is complete).
            sizes = torch.tensor(self.sums.layer_sizes, dtype=dtype, device=complete.device)
            factor = sizes.sum() / (sizes * complete).sum()
            gsnr = torch.where(all_complete, gsnr, gsnr * factor)
            eb = torch.where(all_complete, eb, 1 - (1 - eb) * factor)
        enough = count >= 2
        headline = [
            gsnr,
            stats["noise_scale"],
            torch.zeros((), dtype=dtype, device=complete.device),  # smoothed: set after the EMA
            stats["trace_sigma"],
            stats["grad_sq_norm"],
            stats["coherence"],
            eb,
            count,
        ]
        parts = [torch.stack(headline)]
        if self.per_layer:
            parts += [stats["layer_gsnr"], stats["layer_coherence"]]
        return torch.cat(parts), complete, enough, count

    def _update_ema_and_state(
        self,
        vector: Tensor,
        complete: Tensor,
        valid: Tensor,
        finite: Tensor,
        count: Tensor,
        step: int,
    ) -> None:
        trace = vector[HEADLINE_KEYS.index(keys.NOISE_TRACE_SIGMA)]
        true_sq = vector[HEADLINE_KEYS.index(keys.NOISE_GRAD_SQ_NORM)]
        # A skipped step's inputs may be NaN: the update runs, and torch.where keeps the old
        # states (no host read decides it).
        smoothed = self.noise_scale_ema.update_where(valid, trace, true_sq)
        vector[HEADLINE_KEYS.index(keys.NOISE_SCALE_SMOOTHED)] = smoothed.to(vector.dtype)

        state = self._device_state
        if state is None or state.latest.shape != vector.shape:
            state = _DeviceState(
                latest=torch.full_like(vector, float("nan")),
                latest_complete=torch.zeros_like(complete),
                latest_step=torch.full((), -1, dtype=torch.long, device=vector.device),
                skipped=torch.zeros((), dtype=torch.long, device=vector.device),
                small=torch.zeros((), dtype=torch.bool, device=vector.device),
                partial=torch.zeros_like(complete),
            )
        self._device_state = _DeviceState(
            latest=torch.where(valid, vector, state.latest),
            latest_complete=torch.where(valid, complete, state.latest_complete),
            latest_step=torch.where(valid, step, state.latest_step),
            # An overflow step (or a non-finite loss) is counted, once per optimizer step.
            skipped=state.skipped + (~finite).long(),
            small=state.small | (finite & (count > 0) & (count < 2)),
            partial=state.partial | (~complete & finite & (count >= 2)),
        )
        values = {k: vector[i] for i, k in enumerate(HEADLINE_KEYS)}
        self._last_computed = ComputedStep(step, values, valid)

    def _resolve(self) -> None:
        """Read the device state on the host (one transfer): the latest valid step's values,
        and the warnings owed since the last read. Called on logging steps, at epoch ends and
        when a user reads :attr:`latest`."""
        state = self._device_state
        if state is None:
            return
        layers = list(self._layer_sizes)
        n_layers = len(layers)
        packed = torch.cat(
            [
                state.latest.double(),
                state.latest_complete.double(),
                state.partial.double(),
                torch.stack([state.latest_step, state.small.long(), state.skipped]).double(),
            ]
        ).cpu()
        n_values = state.latest.numel()
        vector = packed[:n_values]
        complete = packed[n_values : n_values + n_layers].bool().tolist()
        partial = packed[n_values + n_layers : n_values + 2 * n_layers].bool().tolist()
        latest_step, small, skipped = (int(v) for v in packed[-3:].tolist())
        self._skipped_host += skipped
        self._device_state = state._replace(
            small=torch.zeros_like(state.small),
            partial=torch.zeros_like(state.partial),
            skipped=torch.zeros_like(state.skipped),
        )
        if small and not self._warned_small_batch:
            self._warned_small_batch = True
            rank_zero_warn(
                "GradientSNR: the effective batch has 1 sample(s); variance, GSNR, noise "
                "scale and the EB criterion need at least 2, so these steps are skipped. Use a "
                "batch size >= 2 (or accumulate_grad_batches >= 2)."
            )
        for name, missed in zip(layers, partial, strict=True):
            if missed and name not in self._warned_partial:
                self._warned_partial.add(name)
                rank_zero_warn(
                    f"GradientSNR: parameter '{name}' had no per-sample statistics for part of "
                    f"the batch (see the probe's warning for why) and is left out of the "
                    f"noise statistics on such steps."
                )
        if latest_step < 0:
            return
        self._latest_step = latest_step
        latest = {k: vector[i] for i, k in enumerate(HEADLINE_KEYS)}
        layer_values: dict[str, float] = {}
        if self.per_layer:
            offset = len(HEADLINE_KEYS)
            host = vector[offset:].tolist()
            for q, quantity in enumerate(LAYER_QUANTITIES):
                for k, name in enumerate(layers):
                    if complete[k]:
                        key = keys.layer_key(keys.GSNR_FAMILY, quantity, name)
                        latest[key] = vector[offset + q * n_layers + k]
                        layer_values[key] = host[q * n_layers + k]
        self._latest = latest
        self._latest_layers = layer_values

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve()  # warnings owed by steps since the last logging step

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


def _layer_bins(values: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Equal-width bins for a histogram of ``n >= 1`` finite values: ``(n+1,)`` float64 edges
    over their range (a unit-wide bin around a single repeated value) and ``(n,)`` counts.
    Formed in Python: there are a handful of values (one per layer)."""
    values = [float(v) for v in values]
    n = len(values)
    low, high = min(values), max(values)
    width = high - low if high > low else max(abs(low), 1.0)
    if high == low:
        low -= width / 2
    edges = torch.tensor([low + width * k / n for k in range(n + 1)], dtype=torch.float64)
    counts = [0.0] * n
    for v in values:
        counts[min(max(math.floor((v - low) * (n / width)), 0), n - 1)] += 1.0
    return edges, torch.tensor(counts, dtype=torch.float64)


# Kept importable from here, where it lived before it got its own module.
from .eb_early_stopping import EBEarlyStopping  # noqa: E402

__all__ = ["ComputedStep", "EBEarlyStopping", "GradientSNR", "optimizer_steps_done"]
