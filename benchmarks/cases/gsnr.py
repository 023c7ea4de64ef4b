"""Benchmark cases for ``GradientSNR``: every step, and on Lightning's logging steps only."""

from __future__ import annotations

from benchmarks.harness import MODEL_KEYS, CallbackCase
from lightning_gradwatch import GradientSNR

CASES: list[CallbackCase] = [
    CallbackCase(
        label="gsnr every step",
        make_callbacks=lambda: [GradientSNR(every_n_steps=1)],
        trainer_kwargs={"log_every_n_steps": 1},
        target={"mlp": 1.8, "cnn": 2.0, "transformer": 2.0},
    ),
    CallbackCase(
        label="gsnr every 50 steps",
        make_callbacks=lambda: [GradientSNR()],
        trainer_kwargs={"log_every_n_steps": 50},
        target={key: 1.03 for key in MODEL_KEYS},
    ),
]
