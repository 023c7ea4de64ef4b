"""The per-epoch GWA aggregate of :class:`GradientWeightAlignment`: the moments of the
epoch's scores (whole selection and per layer), summed across ranks, and the histogram of the
scores as written to TensorBoard."""

from __future__ import annotations

import math
import warnings

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .._lightning import mark_metric_loaded
from ..functional.alignment import cosine_alignment
from ..metrics.alignment import AlignmentMoments
from ..probe import ProbeStats
from ..probe.stats import finite_flags, flag_holder

#: Bins over ``[-1, 1]`` of the histogram state (width 5e-4). The state is fine and fixed, so
#: that the ranks' counts add up exactly; the written histogram covers only its filled range,
#: re-binned (:func:`zoomed_histogram`): the scores of a classifier sit within a few tenths
#: of 0, where fixed bins over ``[-1, 1]`` would show their shape as one spike.
FINE_BINS = 4000


#: Batches are added to the metrics together, every this many batches or samples (whichever
#: comes first) and before anything reads the metrics: one batched update of about twenty
#: kernels instead of that many per batch, while the batches held wait as ``(B,)`` vectors.
FLUSH_BATCHES = 64
FLUSH_SAMPLES = 65536

#: One batch's statistics of one selection: ``(B,)`` ``<g_i, w>``, ``(B,)`` ``|g_i|^2`` and
#: ``()`` ``|w|^2``, from which :func:`cosine_alignment` gives the batch's scores.
_Batch = tuple[Tensor, Tensor, Tensor]


class EpochAggregate:
    """Moments of the epoch's scores: over the concatenated selection (``epoch``, with the
    histogram) and, in multi-layer mode, per layer (``layers``, no histogram).

    :meth:`update` only keeps the batch's statistics; :meth:`flush` scores the kept batches
    and adds them to the metrics at once. Every method that reads or replaces the metrics
    flushes first, so the metrics always include every batch when read (by :meth:`compute`,
    :meth:`state` for a checkpoint, or a move to another device).
    """

    def __init__(self) -> None:
        self.epoch = AlignmentMoments(histogram_bins=FINE_BINS)
        self.layers: dict[str, AlignmentMoments] = {}
        self._pending: list[_Batch] = []
        self._pending_layers: dict[str, list[_Batch]] = {}
        self._pending_stats: list[ProbeStats] = []  # for each kept batch's finiteness flag
        self._pending_samples = 0

    def add_layers(self, names: list[str]) -> None:
        for name in names:
            self.layers.setdefault(name, AlignmentMoments(histogram_bins=1))

    def to(self, device: torch.device) -> None:
        self.flush()
        self.epoch.to(device)
        for metric in self.layers.values():
            metric.to(device)

    def update(self, stats: ProbeStats, names: list[str], per_layer: bool) -> None:
        """Keep the batch's statistics of ``names`` (together, and per layer with
        ``per_layer``), to be scored by :meth:`flush` exactly as ``stats.alignment(names)``
        scores them. A non-finite batch (AMP overflow) will add nothing: its flag
        (``stats.finite``) is computed with the others' at the flush, on the device."""
        self._pending.append(_selection(stats, names))
        if per_layer:
            for name in names:
                self._pending_layers.setdefault(name, []).append(_selection(stats, [name]))
        self._pending_stats.append(flag_holder(stats))
        self._pending_samples += stats.batch_size
        if len(self._pending) >= FLUSH_BATCHES or self._pending_samples >= FLUSH_SAMPLES:
            self.flush()

    def flush(self) -> None:
        """Score the kept batches and add them to the metrics (on the device, no
        synchronisation)."""
        if not self._pending:
            return
        pending, layers, finite = self._pending, self._pending_layers, self._pending_stats
        self._pending, self._pending_layers, self._pending_stats = [], {}, []
        self._pending_samples = 0
        flags = finite_flags(finite)
        self.epoch.update(*_scores(pending, flags))
        for name, batches in layers.items():
            self.layers[name].update(*_scores(batches, flags))

    def compute(self) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """The epoch's results over all ranks (a collective), then reset for the next epoch.

        The next epoch's power sums are taken around this epoch's mean (identical on all
        ranks): that keeps float64 cancellation negligible (see ``metrics/alignment.py``).
        """
        self.flush()
        result = _compute_on_every_rank(self.epoch)
        layer_results = {name: _compute_on_every_rank(m) for name, m in self.layers.items()}
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
        self.flush()
        epoch = AlignmentMoments(histogram_bins=FINE_BINS)
        load_metric_state(epoch, metric_state(self.epoch))
        self.epoch = epoch
        for name, metric in list(self.layers.items()):
            copy = AlignmentMoments(histogram_bins=1)
            load_metric_state(copy, metric_state(metric))
            self.layers[name] = copy

    def state(self) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        self.flush()
        return metric_state(self.epoch), {k: metric_state(m) for k, m in self.layers.items()}

    def load_state(
        self, epoch: dict[str, Tensor] | None, layers: dict[str, dict[str, Tensor]]
    ) -> None:
        # The loaded sums replace the current ones, kept batches included.
        self._pending, self._pending_layers, self._pending_stats = [], {}, []
        self._pending_samples = 0
        if epoch is not None:
            load_metric_state(self.epoch, epoch, histogram_shown=True)
        for name, state in layers.items():
            self.add_layers([name])
            load_metric_state(self.layers[name], state)


def _compute_on_every_rank(metric: AlignmentMoments) -> dict[str, Tensor]:
    """``metric.compute()``, which every rank must call (it sums across them), also where this
    rank scored nothing this epoch (a layer the probe left out, whose results are then NaN
    with ``count`` 0): torchmetrics' warning about a compute before any update is noise there.
    """
    if metric.update_count:
        return metric.compute()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The ``compute`` method of metric")
        return metric.compute()


def _selection(stats: ProbeStats, names: list[str]) -> _Batch:
    """The statistics of the concatenation of ``names``, summed as
    :meth:`ProbeStats.alignment` sums them (so the scores are the same)."""
    if len(names) == 1:
        (name,) = names
        return stats.dot[name], stats.sq_norm[name], stats.param_sq_norm[name]
    return (
        torch.stack([stats.dot[n] for n in names]).sum(0),
        stats.grad_sq_norm(names),
        torch.stack([stats.param_sq_norm[n] for n in names]).sum(0),
    )


def _scores(batches: list[_Batch], flags: Tensor) -> tuple[Tensor, Tensor]:
    """The scores of the kept batches, ``(N,)`` over all their samples, and the ``(N,)``
    mask of the samples of finite batches. The cosine is elementwise, so scoring the
    concatenation gives each batch's own scores bit for bit."""
    sizes = [b[0].shape[0] for b in batches]
    dot = torch.cat([b[0] for b in batches])
    sq_norm = torch.cat([b[1] for b in batches])
    if len(set(sizes)) == 1:  # equal batches (the usual case): (K, B) with per-row weights
        rows = (len(sizes), sizes[0])
        weight_sq = torch.stack([b[2] for b in batches]).unsqueeze(1)
        scores = cosine_alignment(dot.view(rows), sq_norm.view(rows), weight_sq)
        return scores.reshape(-1), flags.unsqueeze(1).expand(rows).reshape(-1)
    weight_sq = torch.cat([b[2].expand(n) for b, n in zip(batches, sizes, strict=True)])
    valid = torch.cat([f.expand(n) for f, n in zip(flags, sizes, strict=True)])
    return cosine_alignment(dot, sq_norm, weight_sq), valid


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
