"""Benchmark cases for ``GradientSNR``: every step (logged every step, or on Lightning's
default schedule and timed as whole epochs), and on Lightning's logging steps only."""

from __future__ import annotations

from benchmarks.harness import MODEL_KEYS, CallbackCase
from lightning_gradwatch import GradientSNR

CASES: list[CallbackCase] = [
    CallbackCase(
        label="gsnr every step, logged every step",
        make_callbacks=lambda: [GradientSNR(every_n_steps=1)],
        trainer_kwargs={"log_every_n_steps": 1},
        target={"mlp": 1.8, "cnn": 2.0, "transformer": 2.0},
    ),
    # The statistics every step (the noise scale's EMA and the EB criterion read every
    # step), written on Lightning's default schedule: one step in 50 pays for the writes
    # (``pl_module.log`` costs about 0.3 ms per key in Lightning's own bookkeeping).
    CallbackCase(
        label="gsnr every step, default logging, per epoch",
        make_callbacks=lambda: [GradientSNR(every_n_steps=1)],
        trainer_kwargs={},
        target={"mlp": 1.8, "cnn": 2.0, "transformer": 2.0},
        per_epoch=True,
    ),
    CallbackCase(
        label="gsnr every 50 steps",
        make_callbacks=lambda: [GradientSNR()],
        trainer_kwargs={"log_every_n_steps": 50},
        target={key: 1.03 for key in MODEL_KEYS},
    ),
]
