"""Control row: a callback that does nothing, so the callback table shows the harness's own
noise floor (its ratio should be 1.00x up to measurement noise)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from benchmarks.harness import CallbackCase


class NoOpCallback(Callback):
    """Implements no hook."""


CASES = [
    CallbackCase(
        label="no-op callback (control)",
        make_callbacks=lambda: [NoOpCallback()],
        target={"mlp": 1.05, "cnn": 1.05, "transformer": 1.05},
    )
]
