"""The one logging policy of every callback: when step-level values are written, and by which
route each kind of value leaves.

When: :func:`is_logging_step` is the only answer to "does this step write step-level
values?". It is Lightning's own answer (every ``log_every_n_steps``-th optimizer step, the step
on which the run stops, never with ``log_every_n_steps=0``), so a callback's values appear on
exactly the steps of the user's own ``self.log`` calls. On other steps the callbacks skip the
work of logging altogether, with no host-device synchronisation.

Routes, one per kind of value:

- **Headline scalars** (one per quantity for the whole model, e.g. ``gwa/aggregate``) go
  through ``pl_module.log``: every logger receives them, and ``EarlyStopping`` or
  ``ModelCheckpoint`` can monitor them. :func:`log_headline_step` is the step-level form.
- **Per-layer detail scalars** (one per layer and quantity) go to the loggers in one batched
  call per logging step (:func:`log_scalars_batch`), as Lightning's ``LearningRateMonitor``
  does, because ``pl_module.log`` costs about half a millisecond of bookkeeping per key. They
  are mirrored into ``trainer.callback_metrics``, so they are monitorable too.
- **Histograms, images and the Custom Scalars layout** are TensorBoard-only: these helpers find
  the TensorBoard writer among the trainer's loggers and do nothing (returning False) when
  there is none.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities import rank_zero_warn
from torch import Tensor

from ._lightning import (
    batches_that_stepped,
    logger_connector_logs_this_step,
    update_callback_metrics,
)


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether step-level values are written on the current optimizer step: Lightning's own
    ``log_every_n_steps`` schedule (never when it is 0; always on the step the run stops on).

    Valid in every training hook of a batch, before and after the optimizer step, and constant
    over the micro-batches of one accumulated optimizer step.
    """
    return logger_connector_logs_this_step(trainer)


def log_headline_step(
    pl_module: pl.LightningModule,
    metrics: Mapping[str, Tensor],
    batch_size: int | None = None,
) -> None:
    """Log model-level step scalars through ``pl_module.log`` on logging steps only.

    On other steps Lightning would discard them; skipping the call saves its bookkeeping and
    keeps the step free of synchronisation. NaN values are left out (a NaN would hide the
    last finite value from ``EarlyStopping``), which needs a synchronisation, so it happens on
    logging steps only.

    Args:
        metrics: name -> 0-dim tensor.
        batch_size: the batch size Lightning records with the values (for epoch reduction).
    """
    if not metrics or not is_logging_step(pl_module.trainer):
        return
    # One host read for the whole set rather than one per value.
    values = list(metrics.values())
    devices = {value.device for value in values}
    if len(devices) == 1:
        nan = torch.stack([value.detach().reshape(()).double() for value in values]).isnan()
        skip = nan.tolist()
    else:
        skip = [bool(torch.isnan(value)) for value in values]
    for (name, value), is_nan in zip(metrics.items(), skip, strict=True):
        if not is_nan:
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=batch_size)


def tensorboard_writer(trainer: pl.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger, or ``None``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def warn_if_no_logger(trainer: pl.Trainer, owner: str) -> None:
    """One warning when metrics would go nowhere; the callback keeps working."""
    if not trainer.loggers:
        rank_zero_warn(
            f"{owner}: the Trainer has no logger, so its metrics are computed but not written. "
            f"Pass logger=TensorBoardLogger(...) (or leave logger=True) to record them."
        )


def log_histogram(trainer: pl.Trainer, tag: str, values: Tensor, step: int) -> bool:
    """Write a TensorBoard histogram of ``values`` (any shape). Rank zero only."""
    writer = tensorboard_writer(trainer)
    if writer is None or not trainer.is_global_zero or values.numel() == 0:
        return False
    writer.add_histogram(tag, values.detach().float().cpu(), global_step=step)
    return True


def log_image(trainer: pl.Trainer, tag: str, image: Tensor, step: int) -> bool:
    """Write a ``(3, H, W)`` float image in ``[0, 1]`` to TensorBoard. Rank zero only."""
    writer = tensorboard_writer(trainer)
    if writer is None or not trainer.is_global_zero:
        return False
    writer.add_image(tag, image.detach().float().cpu().clamp(0, 1), global_step=step)
    return True


def add_custom_scalars(trainer: pl.Trainer, category: str, charts: dict[str, list[str]]) -> bool:
    """Add a category to the run's TensorBoard custom-scalars layout: one chart per entry, each
    overlaying the scalars whose tags match the listed regular expressions.

    TensorBoard shows only the last layout written to a run, so the categories of every callback
    are kept per writer and the merged layout is written again each time one is added. Adding
    the same category twice replaces it.
    """
    writer = tensorboard_writer(trainer)
    if writer is None or not trainer.is_global_zero:
        return False
    layouts = _LAYOUTS.setdefault(writer, {})
    layouts[category] = {title: ["Multiline", tags] for title, tags in charts.items()}
    writer.add_custom_scalars(dict(sorted(layouts.items())))
    return True


#: SummaryWriter -> category -> charts: every category written to that run so far (weak keys,
#: so a closed run's layout is forgotten with its writer).
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, list[Any]]]] = (
    weakref.WeakKeyDictionary()
)


def log_histogram_raw(
    trainer: pl.Trainer,
    tag: str,
    bin_edges: Tensor,
    counts: Tensor,
    total: float,
    total_squares: float,
    step: int,
) -> bool:
    """Write a TensorBoard histogram from precomputed bins (e.g. counts summed across ranks by
    a torchmetrics state), without the raw values. Rank zero only.

    Args:
        bin_edges: ``(K+1,)`` increasing edges.
        counts: ``(K,)`` samples per bin.
        total: sum of the values; ``total_squares``: sum of their squares.
    """
    writer = tensorboard_writer(trainer)
    counts = counts.detach().double().cpu()
    if writer is None or not trainer.is_global_zero or float(counts.sum()) == 0:
        return False
    edges = bin_edges.detach().double().cpu()
    filled = torch.nonzero(counts).flatten()
    writer.add_histogram_raw(
        tag,
        min=float(edges[filled[0]]),
        max=float(edges[filled[-1] + 1]),
        num=int(counts.sum()),
        sum=total,
        sum_squares=total_squares,
        bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )
    return True


def log_scalars_batch(trainer: pl.Trainer, metrics: dict[str, Tensor | float]) -> None:
    """Write many step-level scalars in one call per logger, as ``LearningRateMonitor`` does.

    ``pl_module.log`` costs about half a millisecond of Lightning bookkeeping per key, which
    dominates a callback that writes a value per layer at every logging step. These values go
    straight to every logger (rank zero only, at Lightning's logging step) and into
    ``trainer.callback_metrics``, so ``EarlyStopping`` and ``ModelCheckpoint`` can still monitor
    any of them. Non-finite values are left out.
    """
    if not metrics:
        return
    names = list(metrics)
    values = torch.stack(
        [torch.as_tensor(v, dtype=torch.float64).detach().cpu() for v in metrics.values()]
    )
    finite = {n: float(v) for n, v in zip(names, values.tolist(), strict=True) if math.isfinite(v)}
    if not finite:
        return
    update_callback_metrics(
        trainer, {n: torch.tensor(v, dtype=torch.float64) for n, v in finite.items()}
    )
    step = batches_that_stepped(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(finite, step=step)
