"""Shared benchmark vocabulary. The timing harness itself lives in ``overhead.py``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.callbacks import Callback

#: Model keys that ``benchmarks/models.py`` provides.
MODEL_KEYS = ("mlp", "cnn", "transformer")


@dataclass
class CallbackCase:
    """One callback configuration to time against the plain Lightning training step.

    Attributes:
        label: row label in the printed table, e.g. ``"gwa head"``.
        make_callbacks: returns fresh callback instances (called once per timed run).
        models: model keys the case applies to.
        trainer_kwargs: extra ``Trainer`` arguments for both the plain and the probed run,
            e.g. ``{"log_every_n_steps": 50}``.
        target: the ratio asked for, per model key, printed beside the measurement.
        per_epoch: time whole training epochs (every hook, epoch-end work included) instead
            of the median training step; each run is ``epochs`` epochs of
            ``steps_per_epoch`` steps, the first epoch left out as warm-up.
        steps_per_epoch: batches per epoch when ``per_epoch`` (at least Lightning's default
            ``log_every_n_steps=50``, so logging steps are part of the epoch).
        epochs: epochs per run when ``per_epoch``.
    """

    label: str
    make_callbacks: Callable[[], list[Callback]]
    models: tuple[str, ...] = MODEL_KEYS
    trainer_kwargs: dict[str, Any] = field(default_factory=lambda: {"log_every_n_steps": 1})
    target: dict[str, float] = field(default_factory=dict)
    per_epoch: bool = False
    steps_per_epoch: int = 60
    epochs: int = 3
