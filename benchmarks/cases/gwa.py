"""Overhead cases for gradient-weight alignment: head mode (the paper's estimator) and
all-layer mode, logging ``gwa/step_mean`` every step (``log_every_n_steps=1``)."""

from __future__ import annotations

from benchmarks.harness import CallbackCase
from lightning_gradwatch import GradientWeightAlignment

# The benchmark batches carry no dataset indices: attribution is off (indices=None).
CASES = [
    CallbackCase(
        label="gwa head",
        make_callbacks=lambda: [GradientWeightAlignment(params="head", indices=None)],
        trainer_kwargs={"log_every_n_steps": 1},
        target={"mlp": 1.03},
    ),
    CallbackCase(
        label="gwa all layers",
        make_callbacks=lambda: [GradientWeightAlignment(params="all", indices=None)],
        trainer_kwargs={"log_every_n_steps": 1},
        target={"mlp": 1.2},
    ),
]
