"""The one door to Lightning's internals (Lightning and torchmetrics).

Every use of a Lightning or torchmetrics attribute or function that is not public API goes
through this module, so that a Lightning release that moves one touches one file, and
``tests/test_lightning_internals.py`` checks each of them on the installed version (CI runs
the suite on the oldest supported versions, Lightning 2.5 and torchmetrics 1.3.1, and on the
current ones). Everything else in the package uses public API only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning_utilities.core.apply_func import apply_to_collection
from lightning_utilities.core.imports import RequirementCache
from torch import Tensor

#: Lightning 2.6 added ``EarlyStoppingReason``, where an ``EarlyStopping`` records why it
#: stopped; on older releases there is nothing to record it in.
LIGHTNING_GE_2_6 = bool(RequirementCache("lightning>=2.6"))
if LIGHTNING_GE_2_6:
    from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
else:  # pragma: no cover - exercised by the floor-version CI run
    EarlyStoppingReason = None  # type: ignore[assignment, misc]

# Lightning's own traversal of a batch (tuples, lists, dicts, dataclasses, namedtuples), from
# its utilities package, which is not part of Lightning's public API: the loss-reduction
# measurement rebuilds a batch with every per-sample tensor transformed, exactly as Lightning
# walks batches itself.

__all__ = [
    "LIGHTNING_GE_2_6",
    "EarlyStoppingReason",
    "active_grad_scaler",
    "apply_to_collection",
    "batches_that_stepped",
    "current_hook_name",
    "early_stopping_log_info",
    "early_stopping_should_skip",
    "epoch_end_flag",
    "hide_step_values",
    "logger_connector_logs_this_step",
    "mark_metric_loaded",
    "overrides",
    "redirected_call",
    "reset_metric_in_place",
    "runs_redirected_training_step",
    "train_step_context",
    "training_step_redirected",
    "update_callback_metrics",
]


def active_grad_scaler(trainer: pl.Trainer) -> Any | None:
    """The ``torch.amp.GradScaler`` of the trainer's precision plugin when it is enabled
    (``precision="16-mixed"``), else ``None``. ``MixedPrecision.scaler`` is an attribute of
    that one plugin class, not part of the ``Precision`` interface."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def train_step_context(trainer: pl.Trainer) -> Any:
    """The context manager Lightning's training loop enters around ``training_step`` for the
    trainer's precision (autocast under mixed precision, a no-op in full precision): its
    precision plugin's ``train_step_context``, reached through ``Trainer.precision_plugin``."""
    return trainer.precision_plugin.train_step_context()


def batches_that_stepped(trainer: pl.Trainer) -> int:
    """Optimizer steps completed in this fit: the counter Lightning's logging schedule uses
    (constant over the micro-batches of one optimizer step); ``trainer.global_step`` when the
    fit loop does not have it."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    return stepped if isinstance(stepped, int) else int(trainer.global_step)


def logger_connector_logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this step's on-step metrics to the loggers (its logger
    connector's ``should_update_logs``)."""
    return bool(trainer._logger_connector.should_update_logs)


def update_callback_metrics(trainer: pl.Trainer, metrics: Mapping[str, Tensor]) -> None:
    """Put values into ``trainer.callback_metrics`` (what ``EarlyStopping`` and
    ``ModelCheckpoint`` read) without going through ``pl_module.log``."""
    trainer.callback_metrics.update(metrics)


def current_hook_name(pl_module: pl.LightningModule) -> str | None:
    """The hook Lightning is running (the prefix of its result keys), e.g.
    ``"on_train_batch_end"``."""
    return pl_module._current_fx_name


def hide_step_values(trainer: pl.Trainer, keys: Iterable[str]) -> None:
    """Mark logged on-step values (result keys ``"<hook>.<name>"``) as reset, so that
    Lightning does not send their last value to the loggers again at later logging steps;
    ``trainer.callback_metrics`` keeps them."""
    results = getattr(trainer, "_results", None)
    for key in keys:
        item = results.get(key) if results is not None else None
        if item is not None and hasattr(item, "has_reset"):
            item.has_reset = True


def early_stopping_should_skip(callback: EarlyStopping, trainer: pl.Trainer) -> bool:
    """``EarlyStopping``'s own rule for when not to check (e.g. ``fast_dev_run``, sanity
    checking)."""
    return bool(callback._should_skip_check(trainer))


def early_stopping_log_info(callback: EarlyStopping, trainer: pl.Trainer, message: str) -> None:
    """Log ``message`` the way ``EarlyStopping(verbose=True)`` does (with the rank prefix)."""
    callback._log_info(trainer, message, callback.log_rank_zero_only)


def overrides(method_name: str, instance: Any) -> bool:
    """Whether ``instance`` overrides ``method_name`` of its Lightning base class."""
    return bool(is_overridden(method_name, instance))


def epoch_end_flag(callback: Any) -> bool | None:
    """The ``check_on_train_epoch_end`` of an ``EarlyStopping`` or the
    ``save_on_train_epoch_end`` of a ``ModelCheckpoint`` as the user passed it (``None`` when
    unset: Lightning then decides at ``setup``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    if isinstance(callback, EarlyStopping):
        return callback._check_on_train_epoch_end
    if isinstance(callback, ModelCheckpoint):
        return callback._save_on_train_epoch_end
    raise TypeError(f"epoch_end_flag: expected EarlyStopping or ModelCheckpoint, got {callback!r}")


def reset_metric_in_place(metric: Any) -> None:
    """``metric.reset()``, but zeroing its tensor states in place instead of allocating fresh
    copies of their defaults (every default must be zero). For a metric reset every step with
    parameter-sized states; tensors returned by an earlier ``compute`` on one process are the
    states themselves and read zero afterwards."""
    defaults = metric._defaults
    states = [getattr(metric, name) for name in defaults]
    metric._defaults = {}  # the base reset then clears only its bookkeeping
    try:
        metric.reset()
    finally:
        metric._defaults = defaults
    for state in states:
        state.zero_()


def mark_metric_loaded(metric: Any, updated: bool) -> None:
    """After states were assigned directly (from a checkpoint): drop any cached ``compute``
    result and, when the states hold data (``updated``), record an update so that ``compute``
    does not warn that it ran before ``update``."""
    if updated:
        metric._update_count = max(metric._update_count, 1)
    metric._computed = None


def training_step_redirected(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether the strategy wraps the LightningModule (DDP, ``ddp_spawn``), in which case
    Lightning runs ``training_step`` as a call of the module itself, through its forward
    redirection (see :func:`runs_redirected_training_step`)."""
    return trainer.strategy.model is not pl_module


def runs_redirected_training_step(module: Any) -> bool:
    """Whether the LightningModule ``module`` is being called by Lightning's forward
    redirection: it sets ``forward`` on the instance before the wrapper calls the module, so
    the instance's own ``__dict__`` holds a ``forward`` (it also leaves the original, bound,
    there afterwards: ask only for the outermost call of a step already known to be
    redirected, see :func:`training_step_redirected`)."""
    return "forward" in vars(module)


def redirected_call(wrapper: Any, module: pl.LightningModule, method_name: str, *args: Any) -> Any:
    """``module.<method_name>(*args)`` run as a call of ``wrapper``, the path Lightning's
    strategies take for ``training_step`` under DDP (its private ``_ForwardRedirection``).

    The GWA head detector treats a step as redirected as :func:`training_step_redirected`
    and :func:`runs_redirected_training_step` say; this reproduces the call path itself, so
    the detector can be checked against it in one process.
    """
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    return _ForwardRedirection()(wrapper, module, method_name, *args)
