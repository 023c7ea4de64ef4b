"""The layers x steps history of ``sigma_max`` and its TensorBoard heatmap images."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ... import keys
from ...heatmap import heatmap_image, matplotlib_available, plain_heatmap_image
from ...loggers import log_image, tensorboard_writer

#: TensorBoard image tags (the *Images* tab) and the text naming the plain images' rows.
HEATMAP_GROWTH = keys.SPECTRAL_HEATMAP_GROWTH
HEATMAP_LOG_SIGMA = keys.SPECTRAL_HEATMAP_LOG_SIGMA
HEATMAP_ROWS = keys.SPECTRAL_HEATMAP_ROWS
#: Epoch-end heatmap images may take at most 1/HEATMAP_TIME_RATIO of the time since the fit
#: started: an epoch end renders only if the rendering time spent so far plus the expected cost
#: of this rendering (the last one's, or FIRST_RENDER_SECONDS before any) fits. The end of
#: training always writes the latest columns. 1/200: the images are a view, and a labelled pair
#: costs about 0.2 s of CPU (mostly matplotlib's text rendering), so they should cost the run
#: less than the monitoring itself.
HEATMAP_TIME_RATIO = 200.0
#: Expected cost of the first pair of images: matplotlib takes about 0.1 s per image.
FIRST_RENDER_SECONDS = 0.2


def render_heatmap(
    values: Tensor, names: Sequence[str], steps: Sequence[int], title: str, diverging: bool
) -> Tensor:
    """``(layers, steps)`` history -> ``(3, H, W)`` image: labelled axes (layer names, steps)
    and a colour bar with matplotlib; without it, plain cells (row names in the
    ``spectral/heatmap/rows`` text)."""
    if not matplotlib_available():
        return plain_heatmap_image(values, diverging=diverging)
    label = "log(sigma_max / first sigma_max)" if diverging else "log sigma_max"
    return heatmap_image(values, names, steps, title, label, diverging=diverging)


class SigmaHistory:
    """``sigma_max`` of every tracked layer at every read, thinned 2:1 in its older half once
    it holds ``2 * max_columns`` columns, and rendered as two heatmaps.

    Args:
        max_columns: columns kept at full resolution.
    """

    def __init__(self, max_columns: int) -> None:
        self.max_columns = max_columns
        self.names: list[str] = []
        self.steps: list[int] = []
        self.columns: list[Tensor] = []
        self._last_image_step: int | None = None  # newest column in the last images
        self._started: float | None = None  # time.perf_counter() at the fit's start
        self._spent = 0.0  # seconds spent rendering in this fit
        self._expected = FIRST_RENDER_SECONDS  # seconds the next rendering should take

    def start_clock(self) -> None:
        """Start the time budget (at the fit's start)."""
        self._started, self._spent = time.perf_counter(), 0.0

    def reset_for(self, names: list[str]) -> None:
        """Start over when the tracked layers differ from the recorded ones."""
        if self.names and self.names != names:
            self.steps, self.columns = [], []
        self.names = list(names)

    def record(self, step: int, column: Tensor) -> None:
        """Add a ``(L,)`` CPU column (NaN for a skipped layer)."""
        self.steps.append(step)
        self.columns.append(column)
        if len(self.columns) > 2 * self.max_columns:
            # Thin the older half 2:1, keeping the most recent columns at full resolution.
            half = len(self.columns) // 2
            keep = list(range(0, half, 2)) + list(range(half, len(self.columns)))
            self.columns = [self.columns[i] for i in keep]
            self.steps = [self.steps[i] for i in keep]

    def log_images(self, trainer: pl.Trainer, final: bool = False) -> None:
        """Render and write both heatmaps to TensorBoard (rank zero), unless nothing would
        receive them, nothing is new, or (not ``final``) the time budget says wait."""
        if not self.columns or tensorboard_writer(trainer) is None or not trainer.is_global_zero:
            return  # nothing would receive the images: skip the rendering
        if self.steps[-1] == self._last_image_step:
            return  # no column since the last images (epochs shorter than log_every_n_steps)
        started = time.perf_counter()
        if not final and not self._within_budget(started):
            return  # short epochs: keep the rendering a small fraction of the training time
        self._last_image_step = self.steps[-1]
        history = torch.stack(self.columns, dim=1).double()  # (layers, steps)
        log_sigma = history.log()
        growth = log_sigma - _first_finite(log_sigma)[:, None]
        step = trainer.global_step
        title = "sigma_max growth since the first recorded step"
        log_image(trainer, HEATMAP_GROWTH, self._render(growth, title, diverging=True), step)
        title = "log sigma_max (natural log)"
        log_image(trainer, HEATMAP_LOG_SIGMA, self._render(log_sigma, title, False), step)
        self._expected = time.perf_counter() - started
        self._spent += self._expected

    def _within_budget(self, now: float) -> bool:
        if HEATMAP_TIME_RATIO <= 0:
            return True
        elapsed = now - (self._started if self._started is not None else now)
        return (self._spent + self._expected) * HEATMAP_TIME_RATIO <= elapsed

    def _render(self, values: Tensor, title: str, diverging: bool) -> Tensor:
        return render_heatmap(values, self.names, self.steps, title, diverging)

    def log_row_names(self, trainer: pl.Trainer) -> None:
        """The numbered layer names, as TensorBoard text (the plain images have no labels)."""
        writer = tensorboard_writer(trainer)
        if writer is not None and trainer.is_global_zero:
            rows = "\n".join(f"{i}. `{n}`" for i, n in enumerate(self.names))
            writer.add_text(HEATMAP_ROWS, rows, global_step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history_names": list(self.names),
            "history_steps": list(self.steps),
            "history": [c.clone() for c in self.columns],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.names = list(state.get("history_names", []))
        self.steps = list(state.get("history_steps", []))
        self.columns = list(state.get("history", []))


def _first_finite(values: Tensor) -> Tensor:
    """Per row, the first finite entry (NaN if none)."""
    finite = torch.isfinite(values)
    idx = finite.double().argmax(dim=1)
    first = values.gather(1, idx[:, None]).squeeze(1)
    return torch.where(finite.any(dim=1), first, torch.full_like(first, math.nan))
