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
        target: the ratio the issue asks for, per model key, printed beside the measurement.
    """

    label: str
    make_callbacks: Callable[[], list[Callback]]
    models: tuple[str, ...] = MODEL_KEYS
    trainer_kwargs: dict[str, Any] = field(default_factory=lambda: {"log_every_n_steps": 1})
    target: dict[str, float] = field(default_factory=dict)
