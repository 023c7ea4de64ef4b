"""The growth alarm: a layer whose ``sigma_max`` grows by more than a factor within a window."""

from __future__ import annotations

import math
from collections import deque

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


class GrowthAlarm:
    """Flags layers whose ``sigma_max`` exceeds ``factor`` times their minimum over the last
    ``window`` optimizer steps, warning once when a layer enters the alarm.

    Args:
        factor: growth factor, > 1.
        window: the window, in optimizer steps.
    """

    def __init__(self, factor: float, window: int) -> None:
        self.factor = factor
        self.window = window
        #: ``(step, (L,) sigma_max column)`` of the reads within the window.
        self.recent: deque[tuple[int, Tensor]] = deque()
        self.alarmed: set[str] = set()

    def check(self, step: int, column: Tensor, names: list[str]) -> int:
        """Add the read of ``step`` (``(L,)`` CPU column, NaN where skipped); returns the number
        of layers in alarm."""
        while self.recent and self.recent[0][0] < step - self.window:
            self.recent.popleft()
        alarmed: set[str] = set()
        if self.recent:
            past = torch.stack([c for _, c in self.recent])
            past = torch.where(past > 0, past, torch.full_like(past, math.inf))  # NaN/0 ignored
            floor = past.nan_to_num(nan=math.inf).min(0).values
            ratio = column / floor
            for name, r in zip(names, ratio.tolist(), strict=True):
                if math.isfinite(r) and r > self.factor:
                    alarmed.add(name)
        for name in sorted(alarmed - self.alarmed):
            rank_zero_warn(
                f"SpectralNorms: sigma_max of {name!r} grew by more than {self.factor}x within "
                f"{self.window} steps (step {step}). This often precedes a training "
                f"instability; consider a lower learning rate, warm-up, or gradient clipping."
            )
        self.alarmed = alarmed
        self.recent.append((step, column))
        return len(alarmed)
