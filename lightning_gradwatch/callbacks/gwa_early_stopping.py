"""Early stopping on gradient-weight alignment, without a validation set."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from .. import keys
from ..functional.stopping import RULES, select_epoch, should_stop, validate_options
from ._stopping_default import DEFAULT_OPTIONS, DEFAULT_PATIENCE, DEFAULT_RULE
from .gradient_weight_alignment import GradientWeightAlignment, the_gwa_callback
from .gwa_reweighting import GWAReweighting

EPOCH_KEY = keys.GWA_AGGREGATE
#: Rules that read the epoch aggregate's mean or kurtosis, which per-layer GWA does not record.
_EPOCH_MOMENT_RULES = ("mean_after_kurtosis_settles", "gwa_after_kurtosis_settles")
LAYER_PREFIX = keys.layer_key(keys.GWA_FAMILY, "aggregate", "")
#: The names of versions before the naming scheme (``lightning_gradwatch.keys``), still
#: accepted as ``monitor``: the same values under their new names.
_OLD_EPOCH_KEY = "gwa/epoch"
_OLD_LAYER_PREFIX = "gwa/layer/"


class StopReason(str, Enum):
    """Why :class:`GWAEarlyStopping` stopped the run (``stopper.stop_reason``)."""

    NOT_STOPPED = "not_stopped"
    #: ``patience`` epochs passed after the selected epoch.
    PATIENCE = "patience"
    #: an epoch had no finite GWA and ``stop_on_nonfinite=True``.
    NONFINITE = "nonfinite"


class GWAEarlyStopping(Callback):
    """Select the epoch of best gradient-weight alignment, stop after it, restore its weights.

    At the end of every training epoch it asks the Trainer's
    :class:`GradientWeightAlignment` to finish the epoch (its public ``finalize_epoch``, so the
    callbacks' order does not matter), appends *this* epoch's GWA entry (``epoch``, ``gwa``,
    ``mean``, ``kurtosis``; NaN when the GWA callback has no finite scores for the epoch) to
    :attr:`history`, and applies
    :func:`lightning_gradwatch.functional.stopping.select_epoch` /
    :func:`~lightning_gradwatch.functional.stopping.should_stop` to it. Every rank decides on
    the same all-reduced values; the stop flag goes through
    ``trainer.strategy.reduce_boolean_decision``. Once an epoch is selected, it logs the
    selected epoch as ``gwa/selected_epoch`` at the end of every epoch (what
    ``lightning-gradwatch report`` marks on the GWA curve).

    **Which weights "epoch t" means.** The GWA of epoch ``t`` is computed from the scores taken
    during epoch ``t`` before each optimizer step. The weights kept for epoch ``t`` are those
    at the *end* of epoch ``t`` (after its last optimizer step): what
    ``ModelCheckpoint(save_on_train_epoch_end=True)`` saves as ``epoch=t.ckpt``. With
    ``restore_best_weights=True`` (default) a CPU copy of the model's ``state_dict`` is taken
    whenever the selected epoch changes, kept in this callback's checkpoint state, and loaded
    into the model at the end of ``fit``: after ``trainer.fit`` the model holds the weights of
    :attr:`best_epoch`.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning_gradwatch import GradientWeightAlignment, GWAEarlyStopping
        >>> stopper = GWAEarlyStopping()  # DEFAULT_RULE, DEFAULT_PATIENCE
        >>> trainer = pl.Trainer(callbacks=[GradientWeightAlignment(), stopper])  # doctest: +SKIP
        >>> trainer.fit(model, train_loader)  # doctest: +SKIP
        >>> stopper.best_epoch, stopper.stop_reason  # doctest: +SKIP

    Args:
        rule: a name from :data:`~lightning_gradwatch.functional.stopping.RULES`:
            ``"argmax"`` (the paper, from scratch), ``"max_after_first_min"`` (the paper,
            fine-tuning), ... ``None`` (default): :data:`DEFAULT_RULE` with
            :data:`DEFAULT_OPTIONS` under the given ``options``.
        patience: stop once ``patience`` epochs have passed after the selected epoch. ``None``
            never stops early: the run goes to ``max_epochs`` and the rule only selects (the
            paper's post-hoc argmax). Default: :data:`DEFAULT_PATIENCE`.
        restore_best_weights: load the selected epoch's weights into the model at the end of
            ``fit``.
        stop_on_nonfinite: stop as soon as an epoch has no finite GWA (diverged model,
            non-finite gradients). Without it such epochs are never selected and a warning
            says so.
        monitor: ``"gwa/aggregate"`` (default) or ``"gwa_layers/aggregate/<param name>"``
            (multi-layer GWA; ``gwa``-keyed rules only). The former names ``"gwa/epoch"`` and
            ``"gwa/layer/<param name>"`` are read as these, with a warning.
        verbose: log an info message each time the selected epoch changes.
        **options: the rule's options (``warmup``, ``smoothing``, ``min_rel_delta``, ``key``,
            ``settle_tol``), see :mod:`lightning_gradwatch.functional.stopping`.

    Raises:
        ValueError: at construction, for an unknown rule or option; at ``setup``, when the
            Trainer has no (or several) :class:`GradientWeightAlignment` or ``monitor`` is not
            one of its keys.
    """

    def __init__(
        self,
        rule: str | None = None,
        patience: int | None = DEFAULT_PATIENCE,
        restore_best_weights: bool = True,
        stop_on_nonfinite: bool = False,
        monitor: str = EPOCH_KEY,
        verbose: bool = False,
        **options: Any,
    ) -> None:
        if rule is None:
            rule, options = DEFAULT_RULE, {**DEFAULT_OPTIONS, **options}
        validate_options(rule, **options)
        if patience is not None and (
            not isinstance(patience, int) or isinstance(patience, bool) or patience < 1
        ):
            raise ValueError(
                f"patience must be an integer >= 1 (epochs to wait after the selected epoch) or "
                f"None (never stop early, only select), got {patience!r}."
            )
        monitor = _current_name(monitor)
        if monitor != EPOCH_KEY and not monitor.startswith(LAYER_PREFIX):
            raise ValueError(
                f"GWAEarlyStopping(monitor={monitor!r}): monitor must be {EPOCH_KEY!r} or "
                f"'{LAYER_PREFIX}<param name>'."
            )
        if monitor != EPOCH_KEY and (
            rule in _EPOCH_MOMENT_RULES or options.get("key", "gwa") != "gwa"
        ):
            raise ValueError(
                f"GWAEarlyStopping(monitor={monitor!r}): per-layer GWA records only the "
                f"aggregate, so rule {rule!r} with options {options} cannot use it. Monitor "
                f"{EPOCH_KEY!r} or use a 'gwa'-keyed rule such as 'argmax'."
            )
        self.rule = rule
        self.options = dict(options)
        self.patience = patience
        self.restore_best_weights = restore_best_weights
        self.stop_on_nonfinite = stop_on_nonfinite
        self.monitor = monitor
        self.verbose = verbose

        #: one entry per training epoch judged: ``epoch``, ``gwa``, ``mean``, ``kurtosis``.
        self.history: list[dict[str, float]] = []
        #: the selected epoch (``None`` until the rule selects one).
        self.best_epoch: int | None = None
        #: the monitored value at :attr:`best_epoch`.
        self.best_score: float | None = None
        #: the epoch at which it stopped the run (``None`` if it did not).
        self.stopped_epoch: int | None = None
        self.stop_reason: StopReason = StopReason.NOT_STOPPED
        #: the epoch whose weights were loaded at the end of ``fit`` (``None`` if none).
        self.restored_epoch: int | None = None
        # CPU copies of the model state: the selected epoch's, and the latest epoch's while no
        # epoch is selected (a rule such as max_after_first_min may select the epoch *before*
        # the one that reveals the first minimum).
        self._best_state: dict[str, Tensor] | None = None
        self._best_state_epoch: int | None = None
        self._pending_state: dict[str, Tensor] | None = None
        self._pending_state_epoch: int | None = None
        self._gwa: GradientWeightAlignment | None = None
        self._skipped_at_epoch_start = 0
        self._warned_degenerate = False

    @property
    @override
    def state_key(self) -> str:
        # Not keyed on the rule: a run resumed with another rule keeps the history (and warns).
        # Lightning reads it around every hook call (profiler labels): built once per monitor.
        monitor = self.monitor
        cached = self.__dict__.get("_state_key_cache")
        if cached is None or cached[0] is not monitor:
            cached = self._state_key_cache = (monitor, self._generate_state_key(monitor=monitor))
        return cached[1]

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        gwa = the_gwa_callback(
            trainer,
            "GWAEarlyStopping",
            "pass Trainer(callbacks=[GradientWeightAlignment(), GWAEarlyStopping(...)]).",
        )
        self._gwa = gwa
        gwa.set_epoch_selector(self)  # gwa.most_misaligned(k, epoch="best") uses this selection
        if any(isinstance(c, GWAReweighting) for c in trainer.callbacks):  # type: ignore[attr-defined]
            rank_zero_warn(
                "GWAEarlyStopping beside GWAReweighting: the reweighting changes the gradients "
                "that GWA scores (a sample weighted 0 has a zero gradient and scores 0), so "
                f"{keys.GWA_AGGREGATE} no longer follows the model's generalisation. Measured "
                "on MNIST-1D and scikit-learn digits, the pair picked poor epochs and ended 1 to "
                "13 points below reweighting alone (benchmarks/README.md). When reweighting, "
                "train a fixed number of epochs, or select the epoch on a validation set."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every callback's setup: the GWA callback knows its per-layer names by now.
        gwa = self._gwa
        if gwa is None or self.monitor == EPOCH_KEY:
            return
        valid = [EPOCH_KEY]
        if gwa.multi_layer:
            valid += [LAYER_PREFIX + name for name in gwa.score_names]
        if self.monitor not in valid:
            raise ValueError(
                f"GWAEarlyStopping(monitor={self.monitor!r}) is not a key the "
                f"GradientWeightAlignment callback logs. Valid keys: {valid}."
                + (
                    ""
                    if gwa.multi_layer
                    else " Per-layer keys need GradientWeightAlignment(params='all') or a "
                    "list of two or more weight names."
                )
            )

    # ------------------------------------------------------------------ decision
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._gwa is not None:
            self._skipped_at_epoch_start = self._gwa.skipped_steps

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gwa = self._gwa
        if gwa is None or trainer.fast_dev_run:
            return
        gwa.finalize_epoch(trainer, pl_module)
        epoch = trainer.current_epoch
        entry = self._entry_for_epoch(gwa, epoch)
        self.history.append(entry)
        finite = math.isfinite(entry["gwa"])
        if not finite:
            rank_zero_warn(
                f"GWAEarlyStopping: no finite {self.monitor} for epoch {epoch}: "
                f"{self._nonfinite_reason(gwa, entry)}. This epoch cannot be selected"
                + (
                    "; stopping (stop_on_nonfinite=True)."
                    if self.stop_on_nonfinite
                    else "; pass GWAEarlyStopping(stop_on_nonfinite=True) to stop the run here."
                )
            )
        selected = select_epoch(self.history, self.rule, **self.options)
        self._track_selection(trainer, pl_module, selected, epoch)
        if self.best_epoch is not None:
            # Identical on every rank (decided on all-reduced values); sync_dist only keeps
            # Lightning's check for distributed epoch-level logging quiet.
            pl_module.log(
                keys.GWA_SELECTED_EPOCH,
                float(self.best_epoch),
                on_step=False,
                on_epoch=True,
                sync_dist=True,
            )
        stop, reason = False, StopReason.NOT_STOPPED
        if not finite and self.stop_on_nonfinite:
            stop, reason = True, StopReason.NONFINITE
        elif self.patience is not None and should_stop(
            self.history, self.rule, self.patience, **self.options
        ):
            stop, reason = True, StopReason.PATIENCE
        # Identical inputs on every rank give identical decisions; any() guards the odd case.
        stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and not trainer.should_stop:
            self.stopped_epoch = epoch
            # Only another rank had a reason (reduce_boolean_decision is an any()): patience.
            no_reason = reason is StopReason.NOT_STOPPED
            self.stop_reason = StopReason.PATIENCE if no_reason else reason
            self._warn_if_degenerate()
            if self.verbose:
                rank_zero_info(
                    f"GWAEarlyStopping: stopping at epoch {epoch} ({self.stop_reason.value}); "
                    f"selected epoch {self.best_epoch}."
                )
        trainer.should_stop = trainer.should_stop or stop

    def _entry_for_epoch(self, gwa: GradientWeightAlignment, epoch: int) -> dict[str, float]:
        """This epoch's GWA entry; NaN when the GWA callback recorded nothing for it (never a
        previous epoch's value)."""
        nan = math.nan
        entry = {"epoch": float(epoch), "gwa": nan, "mean": nan, "kurtosis": nan, "count": 0.0}
        if gwa.history and int(gwa.history[-1]["epoch"]) == epoch:
            recorded = gwa.history[-1]
            entry.update({k: float(recorded[k]) for k in ("gwa", "mean", "kurtosis", "count")})
            if self.monitor != EPOCH_KEY:
                name = self.monitor[len(LAYER_PREFIX) :]
                layer = gwa.layer_history.get(name, [])
                entry["gwa"] = float(layer[-1]) if len(layer) == len(gwa.history) else nan
        return entry

    def _nonfinite_reason(self, gwa: GradientWeightAlignment, entry: dict[str, float]) -> str:
        skipped = gwa.skipped_steps - self._skipped_at_epoch_start
        if entry["count"] == 0 and skipped > 0:
            return (
                f"the per-sample gradients were not finite in {skipped} step(s) and no step had "
                "finite scores, so the loss or the weights have likely become NaN/inf (lower the "
                "learning rate, clip gradients, or check the loss)"
            )
        if entry["count"] == 0:
            return (
                "the GradientWeightAlignment callback recorded no scores this epoch (the scored "
                "weights were excluded by the probe or never received a gradient; see its "
                "warning)"
            )
        if math.isfinite(entry["mean"]):
            return (
                "all scores of the epoch are equal, so the excess kurtosis and the aggregate are "
                "undefined"
            )
        return "the scores are not finite"

    def _track_selection(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        selected: int | None,
        epoch: int,
    ) -> None:
        """Update :attr:`best_epoch` and the CPU copy of its weights (end of ``epoch``)."""
        if selected is None:
            if self.restore_best_weights:
                self._pending_state = _cpu_state(pl_module)
                self._pending_state_epoch = epoch
            return
        best_epoch = int(self.history[selected]["epoch"])
        self.best_score = float(self.history[selected]["gwa"])
        if best_epoch == self.best_epoch:
            return
        self.best_epoch = best_epoch
        if self.verbose:
            rank_zero_info(
                f"GWAEarlyStopping: epoch {best_epoch} selected ({self.monitor} = "
                f"{self.best_score:.6g}, rule {self.rule!r})."
            )
        if not self.restore_best_weights:
            return
        if best_epoch == epoch:
            self._best_state, self._best_state_epoch = _cpu_state(pl_module), epoch
        elif best_epoch == self._pending_state_epoch:
            self._best_state, self._best_state_epoch = self._pending_state, best_epoch
        else:
            # select_epoch only moves to the newest epoch or, when it first selects, to an
            # earlier unselected one whose copy is pending; anything else has no saved weights.
            self._best_state, self._best_state_epoch = None, None
            rank_zero_warn(
                f"GWAEarlyStopping: rule {self.rule!r} selected epoch {best_epoch}, whose weights "
                "were not kept, so they will not be restored. Keep a checkpoint per epoch "
                "(ModelCheckpoint(save_top_k=-1, save_on_train_epoch_end=True)) and load that "
                "epoch's file."
            )
        self._pending_state, self._pending_state_epoch = None, None

    def _warn_if_degenerate(self) -> None:
        """Once, when stopping or at the end of ``fit``: the curve is all NaN, flat, or peaks
        at its first epoch, three signs that its maximum is not the paper's generalisation
        peak."""
        if self._warned_degenerate or not self.history:
            return
        values = [entry["gwa"] for entry in self.history]
        finite = [v for v in values if math.isfinite(v)]
        advice = (
            f"Look at the {keys.GWA_AGGREGATE} curve before trusting the selection; a LayerNorm "
            "before the classifier head, a learning-rate warm-up, or the rule option "
            "warmup=<epochs> usually gives a curve with an interior maximum."
        )
        message = None
        if not finite:
            self._warned_degenerate = True
            rank_zero_warn(
                f"GWAEarlyStopping: GWA was non-finite in all {len(values)} epochs, so no epoch "
                "was selected and no weights are restored; the per-epoch warnings give the reason."
            )
            return
        elif len(finite) >= 3 and max(finite) - min(finite) <= 1e-6 * max(1.0, abs(max(finite))):
            message = f"the GWA curve is flat ({finite[0]:.6g}) over {len(finite)} epochs."
        elif (
            len(values) >= 3
            and self.best_epoch is not None
            and self.best_epoch == int(self.history[0]["epoch"])
            and self.best_epoch != int(self.history[-1]["epoch"])
        ):
            message = (
                f"the selected epoch is the first one ({self.best_epoch}): the early-training "
                "transient, not a generalisation peak, is the maximum."
            )
        if message is not None:
            self._warned_degenerate = True
            rank_zero_warn(f"GWAEarlyStopping: {message} {advice}")

    # ------------------------------------------------------------------ restore
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._warn_if_degenerate()
        if self.best_epoch is None and any(math.isfinite(h["gwa"]) for h in self.history):
            rank_zero_warn(
                f"GWAEarlyStopping: rule {self.rule!r} selected no epoch in {len(self.history)} "
                "epochs (with 'max_after_first_min': GWA never rose after falling), so the model "
                "keeps its last weights. Train longer, or select post hoc with "
                "GradientWeightAlignment.best_epoch(rule='argmax')."
            )
        if not self.restore_best_weights or self.best_epoch is None:
            return
        # Every rank decided on the same all-reduced values; check it before loading.
        rank_zero_epoch = trainer.strategy.broadcast(self.best_epoch, src=0)
        agree = trainer.strategy.reduce_boolean_decision(rank_zero_epoch == self.best_epoch)
        if not agree:
            raise RuntimeError(
                f"GWAEarlyStopping: the ranks selected different epochs (this rank "
                f"{self.best_epoch}, rank 0 {rank_zero_epoch}); the weights are left as they are. "
                "This means the ranks saw different GWA values; please report it."
            )
        if self._best_state is None or self._best_state_epoch != self.best_epoch:
            return
        pl_module.load_state_dict(self._best_state)
        self.restored_epoch = self.best_epoch
        rank_zero_info(
            f"GWAEarlyStopping: restored the weights of epoch {self.best_epoch} (end of that "
            f"epoch; {self.monitor} = {self.best_score:.6g}, rule {self.rule!r})."
        )

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "options": dict(self.options),
            "history": [dict(h) for h in self.history],
            "best_epoch": self.best_epoch,
            "best_score": self.best_score,
            "stopped_epoch": self.stopped_epoch,
            "stop_reason": self.stop_reason.value,
            "best_state": self._best_state,
            "best_state_epoch": self._best_state_epoch,
            "pending_state": self._pending_state,
            "pending_state_epoch": self._pending_state_epoch,
            "warned_degenerate": self._warned_degenerate,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("rule", self.rule) != self.rule or dict(
            state_dict.get("options", self.options)
        ) != dict(self.options):
            rank_zero_warn(
                f"GWAEarlyStopping: the checkpoint was written with rule "
                f"{state_dict.get('rule')!r} {state_dict.get('options')}, this run uses "
                f"{self.rule!r} {self.options}; the history is kept and the new rule applies."
            )
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.best_epoch = state_dict.get("best_epoch")
        self.best_score = state_dict.get("best_score")
        self.stopped_epoch = state_dict.get("stopped_epoch")
        self.stop_reason = StopReason(state_dict.get("stop_reason", StopReason.NOT_STOPPED.value))
        self._best_state = state_dict.get("best_state")
        self._best_state_epoch = state_dict.get("best_state_epoch")
        self._pending_state = state_dict.get("pending_state")
        self._pending_state_epoch = state_dict.get("pending_state_epoch")
        self._warned_degenerate = bool(state_dict.get("warned_degenerate", False))


def _current_name(monitor: str) -> str:
    """``monitor`` under the naming scheme (a former GWA name is translated, with a warning)."""
    if monitor == _OLD_EPOCH_KEY:
        current = EPOCH_KEY
    elif monitor.startswith(_OLD_LAYER_PREFIX):
        current = LAYER_PREFIX + monitor[len(_OLD_LAYER_PREFIX) :]
    else:
        return monitor
    rank_zero_warn(
        f"GWAEarlyStopping(monitor={monitor!r}): this key is now logged as {current!r} "
        f"(lightning_gradwatch.keys); monitoring {current!r}. Pass monitor={current!r}."
    )
    return current


def _cpu_state(pl_module: pl.LightningModule) -> dict[str, Tensor]:
    """A CPU copy of the module's ``state_dict`` (bitwise; no accelerator memory kept)."""
    return {
        name: value.detach().to("cpu", copy=True) for name, value in pl_module.state_dict().items()
    }


__all__ = ["DEFAULT_OPTIONS", "DEFAULT_PATIENCE", "DEFAULT_RULE", "RULES", "GWAEarlyStopping"]
