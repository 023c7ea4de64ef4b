"""Shared machinery for callbacks driven by a :class:`GradientProbe`."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from .._lightning import active_grad_scaler
from ..probe import GradientProbe, ProbeStats
from ..probe.probe import LossReduction
from ..probe.stats import NonfiniteCount
from ._loss_reduction import ReductionMeasurement, measure_loss_reduction
from ._strategies import refuse_sharded_strategy

#: ``"auto"`` measures the reduction on the first training batch (see ``_loss_reduction``).
LossReductionSetting = Literal["auto", "mean", "sum"]
_REDUCTION_CODES: tuple[LossReduction | None, ...] = ("mean", "sum", None)


def lightning_loss_scale(trainer: pl.Trainer) -> float | Tensor:
    """The factor Lightning multiplied the user's loss by before ``backward``.

    Automatic optimisation divides the loss by ``accumulate_grad_batches``; a 16-bit
    ``GradScaler`` multiplies it by its current scale. Manual optimisation leaves the loss as
    the user returns it. With a ``GradScaler`` the result is a ``()`` float64 tensor on the
    module's device: ``GradScaler.get_scale()`` would read the scale to the host, a
    synchronisation on every step, while ``scaler.scale(one)`` multiplies on the device.
    """
    scale = 1.0
    module = trainer.lightning_module
    if module.automatic_optimization:
        scale /= trainer.accumulate_grad_batches
    scaler = active_grad_scaler(trainer)
    if scaler is not None:
        one = torch.ones((), dtype=torch.float32, device=module.device)
        return scaler.scale(one).to(torch.float64) * scale
    return scale


class ProbeCallback(Callback):
    """Base class: attaches a probe on scheduled training batches and hands each backward's
    statistics to :meth:`on_probe_stats`.

    Subclasses choose the parameters (:meth:`probe_params`), the schedule
    (:meth:`should_probe`) and what to do with the statistics. Backward passes whose
    statistics are not finite (e.g. AMP overflow steps) are skipped and counted in
    :attr:`skipped_steps`: by the base class, which reads the finiteness to the host on
    every probed backward, or, with :attr:`handles_nonfinite`, by the subclass on the device.

    ``backward``: which backward pass of each training batch to use, counted from 0 in the
    order ``training_step`` runs them (several under manual optimisation, e.g. a GAN's
    generator and discriminator losses). ``None``: the batch's only backward pass that reaches
    the tracked parameters; a second one in the same batch raises, since each sample would be
    counted once per backward pass.

    A subclass whose outputs depend on the absolute scale of the per-sample gradients (not
    only on directions or ratios) sets :attr:`needs_loss_scale`; it then measures the loss
    reduction once per fit, on the first training batch (``loss_reduction="auto"``), or checks
    the declared one the same way, and refuses a loss that is neither a mean nor a sum over
    samples.
    """

    #: Whether the subclass's outputs depend on the loss's reduction factor ``c``. Cosines
    #: and ratios (GWA, GSNR, coherence) do not; ``tr(Sigma)`` and ``|G|^2`` do.
    needs_loss_scale: bool = False

    #: Whether :meth:`on_probe_stats` receives every probed backward's statistics, finite or
    #: not, and leaves non-finite ones out itself with the device flag ``stats.finite``
    #: (``torch.where(stats.finite, value, 0)``, a masked count), so that no step waits for
    #: the device. The base class then counts them in :attr:`skipped_steps` through
    #: :meth:`count_nonfinite`, on the device. When ``False``, the base class reads
    #: ``stats.is_finite()`` on every probed backward (one host-device synchronisation) and
    #: calls :meth:`on_probe_nonfinite` instead of :meth:`on_probe_stats` for a non-finite one.
    handles_nonfinite: bool = False

    def __init__(
        self,
        loss_reduction: LossReductionSetting = "auto",
        sum_grad_squared: bool = False,
        backward: int | None = None,
    ):
        super().__init__()
        if loss_reduction not in ("auto", "mean", "sum"):
            raise ValueError(
                f"loss_reduction must be 'auto', 'mean' or 'sum', got {loss_reduction!r}: say "
                f"how your training_step reduces the per-sample losses, or 'auto' to measure it"
            )
        if backward is not None and (
            isinstance(backward, bool) or not isinstance(backward, int) or backward < 0
        ):
            raise ValueError(
                f"backward must be None or the 0-based index of the backward pass to use in "
                f"each training batch (e.g. 1 for the second manual_backward), got {backward!r}"
            )
        self.backward = backward
        self._backward_index = 0  # backward passes seen in the current training batch
        self._used_backward: int | None = None  # the one whose statistics were used
        #: As passed: ``"auto"``, ``"mean"`` or ``"sum"``; the probe holds the value in use.
        self.loss_reduction: LossReductionSetting = loss_reduction
        #: The measurement on the first batch of this fit (``None`` before, or when the
        #: callback does not need one).
        self.reduction_measurement: ReductionMeasurement | None = None
        self._reduction_settled = False
        self.sum_grad_squared = sum_grad_squared
        self.probe: GradientProbe | None = None
        # Skipped steps, counted on the device and read only by skipped_steps: the finiteness
        # of the passes count_nonfinite saw is computed together, so a step adds no kernel.
        self._finite_pending = NonfiniteCount()
        self._batch: Any = None
        self._batch_idx = 0
        self._trainer: pl.Trainer | None = None

    @property
    def skipped_steps(self) -> int:
        """Steps left out because their statistics were not finite (an AMP overflow, a
        non-finite loss). Counts kept on the device are read here (one synchronisation)."""
        return self._finite_pending.value

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._finite_pending.value = value

    def add_skipped(self, count: Tensor) -> None:
        """Add ``count`` (a ``()`` tensor: a bool flag or an integer) to :attr:`skipped_steps`
        without reading it to the host."""
        self._finite_pending.add_count(count)

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
        """Called after every probed backward pass with finite statistics (with every
        one, finite or not, when :attr:`handles_nonfinite` is set)."""

    # -- Lightning hooks -------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategy(trainer.strategy, type(self).__name__)
        self._trainer = trainer
        self.reduction_measurement = None
        # Callbacks whose outputs do not depend on c need no measurement: "auto" is "mean".
        self._reduction_settled = not self.needs_loss_scale
        if self.needs_loss_scale and not pl_module.automatic_optimization:
            if self.loss_reduction == "auto":
                raise ValueError(
                    f"{type(self).__name__}: loss_reduction='auto' cannot be measured with "
                    f"manual optimisation (training_step's return value is not the loss you "
                    f"pass to manual_backward). Pass loss_reduction='mean' if that loss is the "
                    f"mean of the per-sample losses over the batch, or 'sum' if it is their sum."
                )
            self._reduction_settled = True  # declared by the user; trusted, documented
        self.probe = GradientProbe(
            pl_module,
            params=self.probe_params(trainer, pl_module),
            loss_reduction="mean" if self.loss_reduction == "auto" else self.loss_reduction,
            sum_grad_squared=self.sum_grad_squared,
            loss_scale=self._loss_scale,
        )

    def _loss_scale(self) -> float:
        assert self._trainer is not None
        return lightning_loss_scale(self._trainer)

    def _settle_loss_reduction(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Measure the reduction on this batch and apply (or check) it; once per fit."""
        measurement = measure_loss_reduction(trainer, pl_module, batch, batch_idx)
        # Every rank measures its own batch; they must agree (a consistent decision on all
        # ranks: nobody raises alone). Code 2 means "no verdict", 3 "try the next batch".
        code = 3 if measurement is None else _REDUCTION_CODES.index(measurement.verdict)
        codes = trainer.strategy.all_gather(torch.tensor(code, device=pl_module.device))
        lowest, highest = (int(v) for v in torch.stack([codes.min(), codes.max()]).tolist())
        if highest == 3:
            return  # some rank's training_step gave no usable loss on this batch
        self._reduction_settled = True
        self.reduction_measurement = measurement
        assert measurement is not None and self.probe is not None
        name = type(self).__name__
        verdict = _REDUCTION_CODES[lowest] if lowest == highest else None
        if verdict is None:
            reason = measurement.reason or "the ranks measured different reductions"
            if self.loss_reduction == "auto":
                raise ValueError(
                    f"{name}: could not infer how training_step reduces the per-sample losses: "
                    f"{measurement.describe()}; {reason}. Per-sample statistics need a loss "
                    f"L = c * sum_i l_i of per-sample losses l_i: pass loss_reduction='mean' "
                    f"(c = 1/B) or 'sum' (c = 1) if your loss has that form; a loss that mixes "
                    f"samples has no per-sample gradients to monitor."
                )
            rank_zero_warn(
                f"{name}: could not confirm loss_reduction={self.loss_reduction!r}: "
                f"{measurement.describe()}; {reason}. Absolute magnitudes "
                f"(noise_scale/trace_sigma, noise_scale/grad_sq_norm) are exact only if the "
                f"loss is "
                f"{'the mean' if self.loss_reduction == 'mean' else 'the sum'} of per-sample "
                f"losses over the batch."
            )
            return
        if self.loss_reduction not in ("auto", verdict):
            raise ValueError(
                f"{name}: loss_reduction={self.loss_reduction!r} was passed, but "
                f"training_step's loss is a {verdict!r} over samples: "
                f"{measurement.describe()}. Pass loss_reduction={verdict!r} (or 'auto')."
            )
        self.probe.loss_reduction = verdict

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._backward_index, self._used_backward = 0, None
        if self.probe is not None and not self._reduction_settled:
            self._settle_loss_reduction(trainer, pl_module, batch, batch_idx)
        if self.probe is not None and self.should_probe(trainer, batch_idx):
            self._batch, self._batch_idx = batch, batch_idx
            self.probe.reset()
            self.probe.attach()

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        # With the loss the probe also sees a backward that skips a branch beside the layers
        # it reached (a custom LightningModule.backward passing inputs=): see set_loss.
        if self.probe is not None and self.probe.active:
            self.probe.set_loss(loss)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probe = self.probe
        if probe is None or not probe.active:
            return
        index = self._backward_index
        self._backward_index += 1
        if not probe.has_stats:
            return
        stats = probe.stats
        probe.reset()
        if self.backward is not None and index != self.backward:
            return
        if self._used_backward is not None:
            raise RuntimeError(
                f"{type(self).__name__}: training batch {self._batch_idx} ran backward passes "
                f"{self._used_backward} and {index} that both reach the tracked parameters "
                f"{probe.param_names[:4]} (e.g. a GAN's generator and discriminator losses under "
                f"manual optimisation): each sample would be counted once per backward pass. "
                f"Pass backward=<k> to use only the k-th backward pass of each batch (0-based, "
                f"in the order training_step runs them)."
            )
        self._used_backward = index
        if self.handles_nonfinite:
            self.count_nonfinite(stats)
        elif not stats.is_finite():
            self.on_probe_nonfinite(trainer, pl_module)
            return
        with torch.no_grad():
            self.on_probe_stats(trainer, pl_module, stats, self._batch, self._batch_idx)

    def on_probe_nonfinite(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called instead of :meth:`on_probe_stats` for a backward pass whose statistics hold
        NaN or Inf (an AMP overflow, a non-finite loss). Counts it in :attr:`skipped_steps`;
        subclasses that count optimizer steps rather than backward passes override this."""
        self.skipped_steps += 1

    def count_nonfinite(self, stats: ProbeStats) -> None:
        """With :attr:`handles_nonfinite`: called before :meth:`on_probe_stats` on every probed
        backward pass. Adds ``~stats.finite`` to :attr:`skipped_steps` on the device;
        subclasses that count optimizer steps rather than backward passes override this."""
        self._finite_pending.add(stats)

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
