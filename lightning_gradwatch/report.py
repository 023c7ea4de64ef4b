"""``lightning-gradwatch report LOGDIR``: a run's summary as a static HTML page with PNG figures.

Reads the scalars that the callbacks wrote to a TensorBoard run (with tensorboard's
``EventAccumulator``) and the per-sample score files of
``GradientWeightAlignment(write_scores=True)``, and writes ``index.html`` beside one PNG per
figure:

- the GWA curve (``gwa/aggregate``, with ``gwa/mean`` and ``gwa/kurtosis``) with the selected
  epoch;
- per-layer heatmaps over steps: spectral norms and GSNR;
- GSNR and the gradient noise scale over steps;
- the most misaligned samples of the selected epoch.

A metric the run did not log gets a short note in the page instead of its figure.

Usage::

    lightning-gradwatch report lightning_logs/version_0 [-o OUT]
    python -m lightning_gradwatch.report lightning_logs/version_0 [-o OUT]
"""

from __future__ import annotations

import argparse
import csv
import html
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import keys
from .heatmap import heatmap_figure, matplotlib_available

#: Every TensorBoard tag the report reads, in one place, from the naming scheme
#: (:mod:`lightning_gradwatch.keys`). Per-layer tags are regular expressions whose ``layer``
#: group is the row name.
KEYS: dict[str, str] = {
    # GradientWeightAlignment, once per epoch.
    "gwa_aggregate": keys.GWA_AGGREGATE,
    "gwa_mean": keys.GWA_MEAN,
    "gwa_kurtosis": keys.GWA_KURTOSIS,
    # The epoch GWAEarlyStopping selected, where a run logged it; without it the report marks
    # the argmax of the aggregate and says so.
    "gwa_selected_epoch": keys.GWA_SELECTED_EPOCH,
    # Lightning's epoch counter, written beside every logged step: maps steps to epochs.
    "epoch": "epoch",
    # GradientSNR, on its steps.
    "gsnr_mean": keys.GSNR_MEAN,
    "noise_scale": keys.NOISE_SCALE,
    "noise_scale_smoothed": keys.NOISE_SCALE_SMOOTHED,
}
LAYER_KEYS: dict[str, str] = {
    "spectral_sigma_max": "^"
    + re.escape(keys.layer_key(keys.SPECTRAL_FAMILY, "sigma_max", ""))
    + "(?P<layer>.+)$",
    "gsnr_layer": "^" + re.escape(keys.layer_key(keys.GSNR_FAMILY, "gsnr", "")) + "(?P<layer>.+)$",
}
#: The tags of versions before the naming scheme, read as their current names, so that older
#: runs can still be reported on: former tag -> current tag.
FORMER_KEYS: dict[str, str] = {
    "gwa/epoch": keys.GWA_AGGREGATE,
    "gsnr/noise_scale": keys.NOISE_SCALE,
    "gsnr/noise_scale_smoothed": keys.NOISE_SCALE_SMOOTHED,
}
#: Former per-layer tags: regular expression (``layer`` group) -> current tag of that layer.
FORMER_LAYER_KEYS: dict[str, str] = {
    r"^spectral/(?P<layer>.+)/sigma_max$": keys.layer_key(keys.SPECTRAL_FAMILY, "sigma_max", ""),
    r"^gsnr/layer/(?P<layer>.+)$": keys.layer_key(keys.GSNR_FAMILY, "gsnr", ""),
    r"^gwa/layer/(?P<layer>.+)$": keys.layer_key(keys.GWA_FAMILY, "aggregate", ""),
}
#: Per-sample score files of ``GradientWeightAlignment(write_scores=True)``, in the run's
#: directory: ``gwa_scores/epoch_0007.csv`` with columns ``index,score``.
SCORES_DIR = "gwa_scores"
SCORES_FILE = re.compile(r"^epoch_(?P<epoch>\d+)\.csv$")

#: Samples listed in the "most misaligned" table.
MISALIGNED_ROWS = 20

_EVENT_GLOB = "events.out.tfevents.*"


class ReportError(Exception):
    """The log directory cannot be reported on (missing, empty, several runs)."""


@dataclass
class Series:
    """One scalar tag: ``steps`` and ``values`` in logging order."""

    steps: list[int]
    values: list[float]


@dataclass
class Section:
    """One part of the page: a heading, an optional figure file, and HTML paragraphs."""

    title: str
    anchor: str
    figure: str | None = None
    paragraphs: list[str] = field(default_factory=list)


def find_run(logdir: Path) -> Path:
    """The run directory under ``logdir``: ``logdir`` itself if it holds TensorBoard event
    files, else its single sub-directory that does (e.g. ``lightning_logs/version_0``)."""
    if not logdir.exists():
        raise ReportError(f"{logdir} does not exist; pass the directory of a TensorBoard run")
    if not logdir.is_dir():
        raise ReportError(f"{logdir} is not a directory; pass the directory of a TensorBoard run")
    if any(logdir.glob(_EVENT_GLOB)):
        return logdir
    runs = sorted({p.parent for p in logdir.rglob(_EVENT_GLOB)})
    if not runs:
        raise ReportError(
            f"{logdir} holds no TensorBoard event files ({_EVENT_GLOB}); pass the log directory "
            f"of a run trained with a TensorBoardLogger (e.g. lightning_logs/version_0)"
        )
    if len(runs) > 1:
        listing = "\n  ".join(str(r) for r in runs)
        raise ReportError(f"{logdir} holds {len(runs)} runs; pass one of:\n  {listing}")
    return runs[0]


def read_scalars(run: Path) -> dict[str, Series]:
    """Every scalar tag of the run's event files, all points kept (no down-sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    accumulator = EventAccumulator(str(run), size_guidance={SCALARS: 0})
    accumulator.Reload()
    series: dict[str, Series] = {}
    for tag in accumulator.Tags().get("scalars", []):
        events = accumulator.Scalars(tag)
        series[tag] = Series([e.step for e in events], [float(e.value) for e in events])
    return with_current_names(series)


def with_current_names(scalars: dict[str, Series]) -> dict[str, Series]:
    """``scalars`` with every former tag (:data:`FORMER_KEYS`, :data:`FORMER_LAYER_KEYS`)
    under its current name, unless the run also has the current one."""
    renamed: dict[str, Series] = {}
    for tag, series in scalars.items():
        current = FORMER_KEYS.get(tag)
        for pattern, prefix in FORMER_LAYER_KEYS.items():
            match = re.match(pattern, tag)
            if current is None and match is not None:
                current = prefix + match["layer"]
        renamed[current if current is not None and current not in scalars else tag] = series
    return renamed


def _epochs_of(steps: Sequence[int], scalars: dict[str, Series]) -> list[int] | None:
    """The epoch of each step, from Lightning's ``epoch`` scalar logged at the same step."""
    epoch = scalars.get(KEYS["epoch"])
    if epoch is None:
        return None
    at_step = {s: int(v) for s, v in zip(epoch.steps, epoch.values, strict=True)}
    epochs = [at_step.get(s) for s in steps]
    return None if any(e is None for e in epochs) else epochs  # type: ignore[return-value]


@dataclass
class GwaCurve:
    """The per-epoch GWA series and the selected epoch."""

    epochs: list[int]
    gwa: list[float]
    mean: list[float] | None
    kurtosis: list[float] | None
    selected_epoch: int | None
    selected_by: str  # how the selected epoch was chosen, in words
    epoch_source: str  # where the epoch numbers come from, in words


def gwa_curve(scalars: dict[str, Series]) -> GwaCurve | None:
    """``gwa/epoch`` against the epoch number, with the selected epoch; ``None`` if absent."""
    gwa = scalars.get(KEYS["gwa_aggregate"])
    if gwa is None or not gwa.values:
        return None
    epochs = _epochs_of(gwa.steps, scalars)
    epoch_source = "Lightning's epoch scalar at each logged step"
    if epochs is None:
        epochs = list(range(len(gwa.values)))
        epoch_source = "the order of the logged values (no epoch scalar found at their steps)"

    def aligned(key: str) -> list[float] | None:
        other = scalars.get(KEYS[key])
        if other is None:
            return None
        by_step = dict(zip(other.steps, other.values, strict=True))
        return [by_step.get(s, math.nan) for s in gwa.steps]

    selected = scalars.get(KEYS["gwa_selected_epoch"])
    finite = [(v, e) for v, e in zip(gwa.values, epochs, strict=True) if math.isfinite(v)]
    if selected is not None and selected.values:
        selected_epoch = int(selected.values[-1])
        selected_by = f"logged by the run ({KEYS['gwa_selected_epoch']})"
    elif finite:
        # The first maximum, as an early stopper with min_delta=0 keeps it.
        selected_epoch = max(finite, key=lambda ve: (ve[0], -ve[1]))[1]
        selected_by = (
            f"the argmax of {KEYS['gwa_aggregate']} (the run logged no "
            f"{KEYS['gwa_selected_epoch']}, so no GWAEarlyStopping's selection is known; the "
            f"argmax is the paper's rule for training from scratch, "
            f"GWAEarlyStopping(rule='argmax'))"
        )
    else:
        selected_epoch, selected_by = (
            None,
            f"none: every {KEYS['gwa_aggregate']} value is non-finite",
        )
    return GwaCurve(
        epochs=epochs,
        gwa=gwa.values,
        mean=aligned("gwa_mean"),
        kurtosis=aligned("gwa_kurtosis"),
        selected_epoch=selected_epoch,
        selected_by=selected_by,
        epoch_source=epoch_source,
    )


def layer_matrix(
    scalars: dict[str, Series], pattern: str
) -> tuple[list[str], list[int], torch.Tensor] | None:
    """``(layer names, steps, (layers, steps) values)`` of the tags matching ``pattern``
    (NaN where a layer has no value at a step), layers in tag order; ``None`` if none match."""
    regex = re.compile(pattern)
    layers: dict[str, Series] = {}
    for tag, series in scalars.items():
        match = regex.match(tag)
        if match is not None:
            layers[match["layer"]] = series
    if not layers:
        return None
    steps = sorted({s for series in layers.values() for s in series.steps})
    column = {s: j for j, s in enumerate(steps)}
    values = torch.full((len(layers), len(steps)), math.nan, dtype=torch.float64)
    for i, series in enumerate(layers.values()):
        for s, v in zip(series.steps, series.values, strict=True):
            values[i, column[s]] = v
    return list(layers), steps, values


def read_scores(run: Path) -> dict[int, Path]:
    """``epoch -> CSV path`` of the per-sample score files in the run's directory."""
    directory = run / SCORES_DIR
    if not directory.is_dir():
        return {}
    found = {}
    for path in directory.iterdir():
        match = SCORES_FILE.match(path.name)
        if match is not None:
            found[int(match["epoch"])] = path
    return found


def lowest_scores(path: Path, k: int) -> tuple[list[tuple[int, float]], list[float]]:
    """The ``k`` samples with the lowest score (``(index, score)``, lowest first) and every
    finite score of the file."""
    rows: list[tuple[int, float]] = []
    with open(path, newline="") as handle:
        for record in csv.DictReader(handle):
            score = float(record["score"])
            if math.isfinite(score):
                rows.append((int(record["index"]), score))
    rows.sort(key=lambda r: (r[1], r[0]))
    return rows[:k], [s for _, s in rows]


# -- figures ----------------------------------------------------------------------------------


def _new_figure(rows: int, height_per_row: float = 2.2):  # -> matplotlib Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 0.6 + height_per_row * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_gwa(curve: GwaCurve, path: Path) -> None:
    """GWA aggregate, mean and excess kurtosis against the epoch; the selected epoch marked."""
    panels = [(f"{KEYS['gwa_aggregate']} (aggregate)", curve.gwa)]
    if curve.mean is not None:
        panels.append((KEYS["gwa_mean"], curve.mean))
    if curve.kurtosis is not None:
        panels.append((f"{KEYS['gwa_kurtosis']} (excess)", curve.kurtosis))
    figure = _new_figure(len(panels), 1.9)
    axes_list = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for axes, (label, values) in zip(axes_list, panels, strict=True):
        axes.plot(curve.epochs, values, marker="o", markersize=3, linewidth=1.2)
        axes.set_ylabel(label, fontsize=8)
        axes.grid(alpha=0.3)
        if curve.selected_epoch is not None:
            axes.axvline(curve.selected_epoch, color="tab:red", linestyle="--", linewidth=1)
    if curve.selected_epoch is not None:
        axes_list[0].annotate(
            f"selected epoch {curve.selected_epoch}",
            xy=(curve.selected_epoch, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(4, -12),
            textcoords="offset points",
            color="tab:red",
            fontsize=8,
        )
    axes_list[-1].set_xlabel("epoch")
    figure.savefig(path)


def plot_noise(scalars: dict[str, Series], path: Path) -> list[str]:
    """``gsnr/mean`` and the noise scale (raw and smoothed) against the step; returns the tags
    that were plotted."""
    gsnr = scalars.get(KEYS["gsnr_mean"])
    noise = [
        (key, scalars[KEYS[key]])
        for key in ("noise_scale", "noise_scale_smoothed")
        if KEYS[key] in scalars
    ]
    panels = int(gsnr is not None) + int(bool(noise))
    figure = _new_figure(panels)
    axes_list = list(figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0])
    plotted = []
    if gsnr is not None:
        axes = axes_list.pop(0)
        axes.plot(gsnr.steps, gsnr.values, linewidth=1)
        axes.set_ylabel(KEYS["gsnr_mean"], fontsize=8)
        axes.grid(alpha=0.3)
        plotted.append(KEYS["gsnr_mean"])
    if noise:
        axes = axes_list.pop(0)
        for key, series in noise:
            axes.plot(series.steps, series.values, linewidth=1, label=KEYS[key])
            plotted.append(KEYS[key])
        if all(v > 0 for _, s in noise for v in s.values if math.isfinite(v)):
            axes.set_yscale("log")
        axes.set_ylabel("noise scale (samples)", fontsize=8)
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    figure.axes[-1].set_xlabel("optimizer step")
    figure.savefig(path)
    return plotted


def plot_scores(scores: list[float], lowest: list[tuple[int, float]], path: Path) -> None:
    """Histogram of one epoch's per-sample scores, bins from the data; the listed samples
    shaded."""
    figure = _new_figure(1, 2.4)
    axes = figure.subplots()
    axes.hist(scores, bins=min(80, max(10, len(scores) // 20)), color="tab:blue", alpha=0.8)
    if lowest:
        axes.axvspan(min(scores), lowest[-1][1], color="tab:red", alpha=0.15, label="listed below")
        axes.legend(fontsize=8)
    axes.set_xlabel("per-sample GWA score (epoch mean)")
    axes.set_ylabel("samples")
    figure.savefig(path)


# -- page -------------------------------------------------------------------------------------


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def build_report(logdir: Path, out: Path | None = None) -> Path:
    """Write the report of the run in ``logdir`` and return the path of its ``index.html``.

    Args:
        logdir: a TensorBoard run directory, or a directory holding exactly one run.
        out: output directory (created); default ``<run>/gradwatch_report``.

    Raises:
        ReportError: no run, several runs, or matplotlib missing.
    """
    if not matplotlib_available():
        raise ReportError(
            "the report draws its figures with matplotlib, which is not installed; "
            "pip install matplotlib"
        )
    run = find_run(Path(logdir))
    out = Path(out) if out is not None else run / "gradwatch_report"
    out.mkdir(parents=True, exist_ok=True)
    scalars = read_scalars(run)
    sections: list[Section] = []

    # GWA curve.
    section = Section("Gradient-weight alignment per epoch", "gwa")
    curve = gwa_curve(scalars)
    if curve is None:
        section.paragraphs.append(
            _note(f"No {KEYS['gwa_aggregate']} in this run (GradientWeightAlignment not attached).")
        )
    else:
        section.figure = "gwa.png"
        plot_gwa(curve, out / section.figure)
        if curve.selected_epoch is not None:
            index = curve.epochs.index(curve.selected_epoch)
            section.paragraphs.append(
                f'<p>Selected epoch: <strong id="selected-epoch">{curve.selected_epoch}'
                f"</strong> ({KEYS['gwa_aggregate']} = {curve.gwa[index]:.6g}), chosen as "
                f"{html.escape(curve.selected_by)}.</p>"
                if curve.selected_epoch in curve.epochs
                else f'<p>Selected epoch: <strong id="selected-epoch">{curve.selected_epoch}'
                f"</strong>, {html.escape(curve.selected_by)}.</p>"
            )
        else:
            section.paragraphs.append(_note(f"No selected epoch: {curve.selected_by}."))
        section.paragraphs.append(
            f"<p>{len(curve.epochs)} epochs; epoch numbers from {html.escape(curve.epoch_source)}."
            f"</p>"
        )
    sections.append(section)

    # Per-layer heatmaps.
    for key, title, anchor, transform, label in (
        (
            "spectral_sigma_max",
            "Spectral norm per layer",
            "spectral",
            "log",
            "log sigma_max (natural log)",
        ),
        ("gsnr_layer", "GSNR per layer", "gsnr-layers", "log10", "log10 GSNR"),
    ):
        section = Section(title, anchor)
        matrix = layer_matrix(scalars, LAYER_KEYS[key])
        if matrix is None:
            section.paragraphs.append(
                _note(f"No per-layer tags matching {LAYER_KEYS[key]} in this run.")
            )
        else:
            names, steps, values = matrix
            positive = values > 0
            shown = torch.where(positive, values, torch.full_like(values, math.nan))
            shown = shown.log() if transform == "log" else shown.log10()
            section.figure = f"{anchor}.png"
            heatmap_figure(shown, names, steps, title, label).savefig(out / section.figure)
            section.paragraphs.append(
                f"<p>{len(names)} layers x {len(steps)} logged steps; grey cells: no value "
                f"(or a non-positive one, which has no logarithm).</p>"
            )
        sections.append(section)

    # GSNR and noise scale.
    section = Section("GSNR and gradient noise scale", "noise")
    if not any(KEYS[k] in scalars for k in ("gsnr_mean", "noise_scale", "noise_scale_smoothed")):
        section.paragraphs.append(
            _note(
                f"No {KEYS['gsnr_mean']} or {KEYS['noise_scale']} in this run "
                f"(GradientSNR not attached)."
            )
        )
    else:
        section.figure = "noise.png"
        plotted = plot_noise(scalars, out / section.figure)
        last = {tag: scalars[tag].values[-1] for tag in plotted}
        section.paragraphs.append(
            "<p>Last values: "
            + ", ".join(f"{html.escape(t)} = {v:.4g}" for t, v in last.items())
            + ".</p>"
        )
        missing = [KEYS[k] for k in ("gsnr_mean", "noise_scale") if KEYS[k] not in scalars]
        if missing:
            section.paragraphs.append(_note(f"Not in this run: {', '.join(missing)}."))
    sections.append(section)

    # Most misaligned samples.
    section = Section("Most misaligned samples", "misaligned")
    score_files = read_scores(run)
    if not score_files:
        section.paragraphs.append(
            _note(
                f"No {SCORES_DIR}/epoch_XXXX.csv files in this run; pass "
                f"GradientWeightAlignment(write_scores=True) to write them."
            )
        )
    else:
        selected = curve.selected_epoch if curve is not None else None
        epoch = selected if selected in score_files else max(score_files)
        why = "the selected epoch" if epoch == selected else "the last epoch with a score file"
        lowest, scores = lowest_scores(score_files[epoch], MISALIGNED_ROWS)
        if not scores:
            section.paragraphs.append(_note(f"{score_files[epoch].name} holds no finite score."))
        else:
            section.figure = "scores.png"
            plot_scores(scores, lowest, out / section.figure)
            rows = "".join(
                f"<tr><td>{rank}</td><td>{index}</td><td>{score:.6g}</td></tr>"
                for rank, (index, score) in enumerate(lowest, 1)
            )
            section.paragraphs.append(
                f"<p>Epoch {epoch} ({why}), {len(scores)} samples: the {len(lowest)} with the "
                f"lowest epoch-mean score, lowest first.</p>"
                f'<table id="misaligned"><tr><th>rank</th><th>dataset index</th>'
                f"<th>score</th></tr>{rows}</table>"
            )
    sections.append(section)

    page = out / "index.html"
    page.write_text(_html(run, sections), encoding="utf-8")
    return page


def _html(run: Path, sections: list[Section]) -> str:
    body = []
    for section in sections:
        body.append(f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>')
        if section.figure is not None:
            body.append(
                f'<img src="{section.figure}" alt="{html.escape(section.title)}" '
                f'style="max-width:100%">'
            )
        body.extend(section.paragraphs)
        body.append("</section>")
    contents = " · ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>gradwatch report: {html.escape(run.name)}</title>"
        "<style>body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:right}.note{color:#805000}</style></head><body>"
        f"<h1>gradwatch report</h1><p>Run: <code>{html.escape(str(run))}</code></p>"
        f"<p>{contents}</p>" + "\n".join(body) + "</body></html>\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``lightning-gradwatch report LOGDIR [-o OUT]``."""
    parser = argparse.ArgumentParser(
        prog="lightning-gradwatch", description="lightning-gradwatch tools"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report", help="render a run's summary as a static HTML page with PNG figures"
    )
    report.add_argument("logdir", type=Path, help="TensorBoard run directory (or its parent)")
    report.add_argument(
        "-o", "--out", type=Path, default=None, help="output directory (default LOGDIR/...)"
    )
    args = parser.parse_args(argv)
    try:
        page = build_report(args.logdir, args.out)
    except ReportError as error:
        print(f"lightning-gradwatch report: {error}", file=sys.stderr)
        return 2
    print(page)
    return 0


if __name__ == "__main__":
    # `python -m lightning_gradwatch.report LOGDIR` works with or without the word "report".
    arguments = sys.argv[1:]
    if arguments[:1] not in (["report"], ["-h"], ["--help"]):
        arguments = ["report", *arguments]
    sys.exit(main(arguments))
