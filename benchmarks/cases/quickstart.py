"""The README's quick-start set of callbacks, and GWA head mode alone, at their default
settings and Lightning's default ``log_every_n_steps=50``, timed as whole training epochs (so
every logging step and every epoch-end computation is in the figure) with a TensorBoard
logger: the cost of leaving monitoring on."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from benchmarks.harness import MODEL_KEYS, CallbackCase
from lightning_gradwatch import (
    GradientSNR,
    GradientWeightAlignment,
    GWAEarlyStopping,
    SpectralNorms,
)


def quick_start_set() -> list[Callback]:
    # The benchmark batches are (x, y) without dataset indices: attribution is off.
    return [
        GradientWeightAlignment(indices=None),
        GWAEarlyStopping(),
        GradientSNR(),
        SpectralNorms(),
    ]


CASES = [
    CallbackCase(
        label="quick-start set, defaults, per epoch",
        make_callbacks=quick_start_set,
        trainer_kwargs={},
        target=dict.fromkeys(MODEL_KEYS, 1.05),
        per_epoch=True,
    ),
    CallbackCase(
        label="gwa head, defaults, per epoch",
        make_callbacks=lambda: [GradientWeightAlignment(indices=None)],
        trainer_kwargs={},
        target=dict.fromkeys(MODEL_KEYS, 1.02),
        per_epoch=True,
    ),
]
