"""The default GWA epoch-selection rule, shared by ``GWAEarlyStopping`` and
``GradientWeightAlignment.best_epoch``: change it here only (``docs/gwa.md``, "Which rule by
default", gives the measurements behind it)."""

from __future__ import annotations

from typing import Any

#: The paper's fine-tuning rule: the maximum at or after the first local minimum. Training
#: from scratch, it skips the early transient that makes the plain argmax keep epoch 0.
DEFAULT_RULE: str = "max_after_first_min"
#: Epochs to wait after the selected epoch before stopping.
DEFAULT_PATIENCE: int = 10
#: Options of :data:`DEFAULT_RULE` (see ``lightning_gradwatch.functional.stopping``).
DEFAULT_OPTIONS: dict[str, Any] = {}
