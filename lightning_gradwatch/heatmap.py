"""Layers x steps heatmaps with labelled axes and a colour bar, rendered with matplotlib.

Used by :class:`~lightning_gradwatch.SpectralNorms` for its TensorBoard images and by the
``lightning-gradwatch report`` command for its PNG figures. matplotlib is optional: callers
check :func:`matplotlib_available` and fall back to a plain rendering without it.

Figures are built on matplotlib's object API with the Agg canvas (no ``pyplot``), so rendering
never touches the user's global figure state or interactive backend.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: At most this many layer names are written on the y axis; with more rows every k-th is.
MAX_ROW_LABELS = 40
#: Figure width in inches and resolution: 8 in x 100 dpi = 800 px wide images.
WIDTH_INCHES = 8.0
DPI = 100


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (checked without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def heatmap_figure(
    values: Tensor,
    row_labels: Sequence[str],
    steps: Sequence[int],
    title: str,
    colorbar_label: str,
    diverging: bool = False,
) -> Figure:
    """A matplotlib ``Figure`` of a ``(layers, steps)`` heatmap.

    Args:
        values: ``(L, S)`` values; non-finite cells are drawn grey.
        row_labels: ``L`` layer names, top to bottom.
        steps: ``S`` step numbers of the columns (need not be evenly spaced: each column is
            one recorded step and the x ticks name the step).
        title: figure title.
        colorbar_label: what the colour encodes.
        diverging: centre the colour map on 0 (blue below, red above, white at 0, symmetric
            range); otherwise a sequential map from the minimum to the maximum.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    data = values.detach().double().cpu()
    layers, columns = data.shape
    if len(row_labels) != layers or len(steps) != columns:
        raise ValueError(
            f"heatmap_figure: values are {layers} x {columns} but got {len(row_labels)} row "
            f"labels and {len(steps)} steps; pass one label per row and one step per column"
        )
    finite = torch.isfinite(data)
    masked = torch.where(finite, data, torch.full_like(data, math.nan)).numpy()
    if diverging:
        bound = float(data[finite].abs().max()) if finite.any() else 1.0
        bound = bound if bound > 0 else 1.0
        cmap, vmin, vmax = colormaps["RdBu_r"], -bound, bound
    else:
        cmap = colormaps["viridis"]
        vmin = float(data[finite].min()) if finite.any() else 0.0
        vmax = float(data[finite].max()) if finite.any() else 1.0
    cmap = cmap.with_extremes(bad="0.6")

    label_width = max((len(name) for name in row_labels), default=0)
    label_size = 7 if label_width > 20 else 8
    height = min(12.0, 1.6 + 0.22 * min(layers, MAX_ROW_LABELS))
    figure = Figure(figsize=(WIDTH_INCHES, height), dpi=DPI)
    FigureCanvasAgg(figure)
    # Fixed margins sized from the longest layer name: matplotlib's automatic layout engines
    # measure every label and cost more than the rest of the rendering together.
    left = min(0.6, (0.45 + 0.6 * label_size / 72 * label_width) / WIDTH_INCHES)
    figure.subplots_adjust(left=left, right=0.88, bottom=0.55 / height, top=1 - 0.35 / height)
    axes = figure.add_subplot()
    mesh = axes.imshow(
        masked,
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        origin="upper",
    )
    every = max(1, math.ceil(layers / MAX_ROW_LABELS))
    rows = list(range(0, layers, every))
    axes.set_yticks(rows, [row_labels[i] for i in rows], fontsize=label_size)
    steps_list = [int(s) for s in steps]

    def step_at(position: float, _: int) -> str:
        index = round(position)
        return str(steps_list[index]) if 0 <= index < columns else ""

    axes.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    axes.xaxis.set_major_formatter(FuncFormatter(step_at))
    axes.set_xlabel("optimizer step (one column per recorded step)")
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=10)
    colorbar = figure.colorbar(
        mesh, cax=figure.add_axes((0.9, axes.get_position().y0, 0.015, axes.get_position().height))
    )
    colorbar.set_label(colorbar_label, fontsize=8)
    return figure


def figure_to_image(figure: Figure) -> Tensor:
    """Draw ``figure`` and return it as a ``(3, H, W)`` float image in ``[0, 1]``."""
    canvas = figure.canvas
    canvas.draw()
    rgba = torch.frombuffer(bytearray(canvas.buffer_rgba()), dtype=torch.uint8)
    width, height = canvas.get_width_height()
    return rgba.view(height, width, 4)[..., :3].permute(2, 0, 1).float() / 255.0


def heatmap_image(
    values: Tensor,
    row_labels: Sequence[str],
    steps: Sequence[int],
    title: str,
    colorbar_label: str,
    diverging: bool = False,
) -> Tensor:
    """:func:`heatmap_figure` drawn as a ``(3, H, W)`` float image in ``[0, 1]``, the format of
    ``SummaryWriter.add_image``. Needs matplotlib (see :func:`matplotlib_available`)."""
    return figure_to_image(
        heatmap_figure(values, row_labels, steps, title, colorbar_label, diverging=diverging)
    )


def plain_heatmap_image(values: Tensor, diverging: bool = False) -> Tensor:
    """``(layers, steps)`` -> ``(3, H, W)`` image in ``[0, 1]`` without matplotlib: plain
    cells, no axes; NaN cells are grey. The fallback of :func:`heatmap_image`.

    Diverging: white = no change, red = growth, blue = shrinkage, scaled by the largest
    absolute value. Otherwise a black-red-yellow-white ramp from the minimum to the maximum.
    """
    finite = torch.isfinite(values)
    x = torch.where(finite, values, torch.zeros_like(values))
    if diverging:
        scale = x.abs().max().clamp_min(1e-12)
        x = (x / scale).clamp(-1, 1)
        red = 1 - (-x).clamp_min(0)
        blue = 1 - x.clamp_min(0)
        green = 1 - x.abs()
    else:
        lo = x[finite].min() if finite.any() else x.new_tensor(0.0)
        hi = x[finite].max() if finite.any() else x.new_tensor(1.0)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
        red, green, blue = (3 * x).clamp(0, 1), (3 * x - 1).clamp(0, 1), (3 * x - 2).clamp(0, 1)
    image = torch.stack([red, green, blue])
    image = torch.where(finite[None], image, torch.full_like(image, 0.5))
    layers, steps = values.shape
    row_px = max(1, 256 // max(layers, 1))
    col_px = max(1, 512 // max(steps, 1))
    image = image.repeat_interleave(row_px, dim=1).repeat_interleave(col_px, dim=2).float()
    if layers > 1 and row_px >= 6:
        image[:, row_px::row_px, :] = 0.75  # a thin grey line between layers
    return image
