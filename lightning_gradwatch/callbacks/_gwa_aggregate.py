"""The per-epoch GWA aggregate of :class:`GradientWeightAlignment`: the moments of the
epoch's scores (whole selection and per layer), summed across ranks, and the histogram of the
scores as written to TensorBoard."""

from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .._lightning import mark_metric_loaded
from ..metrics.alignment import AlignmentMoments
from ..probe import ProbeStats

#: Bins over ``[-1, 1]`` of the histogram state (width 5e-4). The state is fine and fixed, so
#: that the ranks' counts add up exactly; the written histogram covers only its filled range,
#: re-binned (:func:`zoomed_histogram`): the scores of a classifier sit within a few tenths
#: of 0, where fixed bins over ``[-1, 1]`` would show their shape as one spike.
FINE_BINS = 4000


class EpochAggregate:
    """Moments of the epoch's scores: over the concatenated selection (``epoch``, with the
    histogram) and, in multi-layer mode, per layer (``layers``, no histogram)."""

    def __init__(self) -> None:
        self.epoch = AlignmentMoments(histogram_bins=FINE_BINS)
        self.layers: dict[str, AlignmentMoments] = {}

    def add_layers(self, names: list[str]) -> None:
        for name in names:
            self.layers.setdefault(name, AlignmentMoments(histogram_bins=1))

    def to(self, device: torch.device) -> None:
        self.epoch.to(device)
        for metric in self.layers.values():
            metric.to(device)

    def update(self, stats: ProbeStats, names: list[str], per_layer: bool) -> Tensor:
        """Add the batch's scores; returns the ``(B,)`` scores over ``names`` together."""
        scores = stats.alignment(names)
        # A non-finite backward pass (AMP overflow) adds nothing; the flag stays on the device.
        self.epoch.update(scores, valid=stats.finite)
        if per_layer:
            for name in names:
                self.layers[name].update(stats.alignment([name]), valid=stats.finite)
        return scores

    def compute(self) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """The epoch's results over all ranks (a collective), then reset for the next epoch.

        The next epoch's power sums are taken around this epoch's mean (identical on all
        ranks): that keeps float64 cancellation negligible (see ``metrics/alignment.py``).
        """
        result = self.epoch.compute()
        layer_results = {name: m.compute() for name, m in self.layers.items()}
        for metric, res in [
            (self.epoch, result),
            *((self.layers[k], r) for k, r in layer_results.items()),
        ]:
            metric.reset()
            if math.isfinite(float(res["mean"])):
                metric.set_shift(float(res["mean"]))
        return result, layer_results

    def own_copies(self) -> None:
        """Replace every metric by a copy with its own storage (see
        ``GradientWeightAlignment._own_tensor_state``)."""
        epoch = AlignmentMoments(histogram_bins=FINE_BINS)
        load_metric_state(epoch, metric_state(self.epoch))
        self.epoch = epoch
        for name, metric in list(self.layers.items()):
            copy = AlignmentMoments(histogram_bins=1)
            load_metric_state(copy, metric_state(metric))
            self.layers[name] = copy

    def state(self) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        return metric_state(self.epoch), {k: metric_state(m) for k, m in self.layers.items()}

    def load_state(
        self, epoch: dict[str, Tensor] | None, layers: dict[str, dict[str, Tensor]]
    ) -> None:
        if epoch is not None:
            load_metric_state(self.epoch, epoch, histogram_shown=True)
        for name, state in layers.items():
            self.add_layers([name])
            load_metric_state(self.layers[name], state)


def zoomed_histogram(counts: Tensor, bins: int) -> tuple[Tensor, Tensor] | None:
    """The filled range of a :data:`FINE_BINS` histogram over ``[-1, 1]``, re-binned.

    Args:
        counts: ``(FINE_BINS,)`` counts (summed over ranks).
        bins: at most this many bins in the result.

    Returns:
        ``(edges (K+1,), counts (K,))`` float64 on the CPU, ``K <= bins``: whole groups of
        adjacent fine bins from the first filled one to the last (the last group possibly
        shorter), so every count is kept exactly; ``None`` when no bin is filled.
    """
    counts = counts.detach().double().cpu()
    filled = torch.nonzero(counts).flatten()
    if filled.numel() == 0:
        return None
    low, high = int(filled[0]), int(filled[-1]) + 1
    size = high - low
    group = -(-size // bins)
    kept = -(-size // group)
    padded = torch.zeros(kept * group, dtype=torch.float64)
    padded[:size] = counts[low:high]
    fine_edges = torch.linspace(-1.0, 1.0, counts.numel() + 1, dtype=torch.float64)
    # the last bin ends at the last filled fine bin (it may hold fewer fine bins than a group)
    edge_index = (low + group * torch.arange(kept + 1)).clamp_max(high)
    return fine_edges[edge_index], padded.view(kept, group).sum(1)


def metric_state(metric: AlignmentMoments) -> dict[str, Tensor]:
    """A CPU copy of a metric's state, with its shift."""
    state = {k: v.detach().cpu().clone() for k, v in metric.metric_state.items()}  # type: ignore[union-attr]
    state["shift"] = torch.tensor(metric.shift, dtype=torch.float64)
    return state


def load_metric_state(
    metric: AlignmentMoments, state: dict[str, Tensor], histogram_shown: bool = False
) -> None:
    """Load :func:`metric_state` into ``metric`` (on its device).

    A histogram of another size (a checkpoint of a version with other bins) cannot be mapped
    onto this one's bins exactly: it is dropped, with a warning where the histogram is written
    (``histogram_shown``).
    """
    state = dict(state)
    metric.shift = float(state.pop("shift", 0.0))
    histogram = state.get("histogram_counts")
    if histogram is not None and histogram.shape != metric.histogram_counts.shape:
        del state["histogram_counts"]
        if histogram_shown and float(histogram.sum()) > 0:
            rank_zero_warn(
                "GradientWeightAlignment: the checkpoint's histogram of the unfinished epoch's "
                f"scores has {histogram.numel()} bins, this version keeps "
                f"{metric.histogram_counts.numel()}; the gwa/scores histogram of that epoch "
                "leaves out the samples scored before the checkpoint (the aggregate keeps them)."
            )
    for key, value in state.items():
        current = getattr(metric, key)
        setattr(metric, key, value.to(device=current.device, dtype=current.dtype))
    mark_metric_loaded(metric, updated=float(state.get("count", torch.zeros(()))) > 0)
