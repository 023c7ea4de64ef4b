"""Per-sample attribution of GWA scores: each dataset index's latest score and epoch mean,
merged across ranks at the end of every epoch.

Recording a batch costs no host-device synchronisation: its indices are checked on their
device (:func:`~lightning_gradwatch.data.index_checks`) and the batch is kept pending. The
pending batches are read back and applied, in order, by :meth:`SampleScores.flush`, which the
callback calls on the first batch of a fit (so that wrong indices are refused at the first
batch), on logging steps and at the end of every epoch (and which runs by itself once
:data:`MAX_PENDING` batches are pending). A bad batch later in the epoch is
refused at the next of these, before any of its scores is used.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..data import HOW_TO_INDEX, IndexSpec, index_checks, raise_for_index_checks

#: Pending batches are applied at the latest after this many, so that memory stays bounded
#: when nothing else flushes them (``log_every_n_steps=0`` over a long epoch, or an endless
#: iterable dataset): one read-back per this many batches.
MAX_PENDING = 1024


class SampleScores:
    """Per-sample scores by dataset index, grown to the largest index seen (float64; NaN =
    unseen).

    Args:
        spec: the callback's ``indices`` (for messages).
        keep_history: keep each epoch's per-sample means (:meth:`score_history`).
    """

    def __init__(self, spec: IndexSpec, keep_history: bool) -> None:
        self.spec = spec
        self.keep_history = keep_history
        #: the training dataset's length, when Lightning has a single map-style dataset.
        self.dataset_length: int | None = None
        self.latest: Tensor | None = None
        self.epoch_sum: Tensor | None = None
        self.epoch_count: Tensor | None = None
        #: one ``(N,)`` float32 row of per-sample epoch means per finished epoch.
        self.history: list[Tensor] = []
        self.history_epochs: list[int] = []  # the epoch of each history row
        self.num_indices = 0  # largest dataset index seen + 1 (all ranks, after an epoch)
        self.last_epoch_mean: Tensor | None = None
        # Batches recorded but not yet applied: (indices, float64 scores, index_checks, valid).
        self._pending: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._warned_label_like = False

    # ------------------------------------------------------------------ recording
    def record(self, indices: Tensor, scores: Tensor, valid: Tensor | None = None) -> None:
        """Keep a batch's ``(B,)`` int64 indices and ``(B,)`` float64 scores (same device),
        checked on the device; applied at the next :meth:`flush`. ``valid``: an optional
        ``()`` bool tensor; a batch with False (non-finite statistics) changes no record."""
        if indices.numel() == 0:
            return
        if valid is None:
            valid = torch.ones((), dtype=torch.bool, device=scores.device)
        self._pending.append((indices, scores, index_checks(indices), valid))
        if len(self._pending) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Check the pending batches (one host synchronisation for all of them) and apply
        them in the order they were recorded.

        Raises:
            ValueError: a batch with negative, repeated or out-of-range indices (nothing of
                it or of the later batches is applied).
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        checks = torch.stack([c for _, _, c, _ in pending]).tolist()
        end = self.num_indices
        for values in checks:
            end = max(end, raise_for_index_checks(tuple(values), self.spec, self.dataset_length))
        self.num_indices = end
        self._grow(end, pending[0][1].device)
        assert self.latest is not None and self.epoch_sum is not None
        assert self.epoch_count is not None
        for indices, scores, _, valid in pending:
            self.latest[indices] = torch.where(valid, scores, self.latest[indices])
            self.epoch_sum.index_add_(0, indices, torch.where(valid, scores, 0.0))
            self.epoch_count.index_add_(0, indices, valid.to(scores.dtype).expand_as(scores))

    def _grow(self, size: int, device: torch.device) -> None:
        current = 0 if self.latest is None else self.latest.numel()
        if size <= current:
            return
        size = max(size, 2 * current)

        def grown(old: Tensor | None, fill: float) -> Tensor:
            new = torch.full((size,), fill, dtype=torch.float64, device=device)
            if old is not None:
                new[: old.numel()] = old.to(device)
            return new

        self.latest = grown(self.latest, float("nan"))
        self.epoch_sum = grown(self.epoch_sum, 0.0)
        self.epoch_count = grown(self.epoch_count, 0.0)

    # ------------------------------------------------------------------ epoch end
    def merge_ranks(self, trainer: pl.Trainer, device: torch.device) -> bool:
        """Sum the epoch's per-sample sums over the ranks (collectives through
        ``trainer.strategy``); False when no rank has seen an index."""
        self.flush()
        size = torch.tensor(self.num_indices, device=device)
        self.num_indices = int(trainer.strategy.all_gather(size).max())
        if self.num_indices == 0:
            return False
        self._grow(self.num_indices, device)
        assert self.latest is not None and self.epoch_sum is not None
        assert self.epoch_count is not None
        # Buffers may have grown to different capacities: exchange the common prefix.
        size = self.num_indices
        count, latest_all = self.epoch_count[:size], self.latest[:size]
        seen = (count > 0).to(torch.float64)
        latest = torch.where(seen > 0, latest_all, torch.zeros_like(latest_all))
        packed = torch.stack([self.epoch_sum[:size], count, latest, seen])
        packed = trainer.strategy.reduce(packed, reduce_op="sum")
        self.epoch_sum, self.epoch_count = packed[0].clone(), packed[1].clone()
        # A sample seen on several ranks this epoch (DistributedSampler padding) keeps the
        # mean of their latest scores.
        merged = packed[2] / packed[3].clamp_min(1)
        self.latest = torch.where(packed[3] > 0, merged, latest_all)
        return True

    def finish_epoch(self, epoch: int) -> Tensor | None:
        """Append epoch ``epoch``'s per-sample means (after :meth:`merge_ranks` under several
        processes) and clear the sums; returns the ``(N,)`` float32 means (NaN: not seen), or
        ``None`` before any indexed batch."""
        self.flush()
        if self.latest is None or self.epoch_sum is None or self.epoch_count is None:
            return None
        self._warn_if_indices_look_like_labels()
        size = self.num_indices
        epoch_mean = self.epoch_sum[:size] / self.epoch_count[:size]
        epoch_mean[self.epoch_count[:size] == 0] = float("nan")
        self.last_epoch_mean = epoch_mean.float().cpu()
        if self.keep_history:
            self.history.append(self.last_epoch_mean)
            self.history_epochs.append(epoch)
        self.epoch_sum.zero_()
        self.epoch_count.zero_()
        return self.last_epoch_mean

    def _warn_if_indices_look_like_labels(self) -> None:
        """Warn once when an epoch attributed many samples to few distinct indices: every
        sample is normally seen about once per epoch, so labels or class ids taken as indices
        (the same few values in every batch) show up here even when a batch holds no repeat."""
        assert self.epoch_count is not None
        scored = self.epoch_count.sum()
        distinct = (self.epoch_count > 0).sum()
        if self._warned_label_like or not bool(4 * distinct <= scored):
            return
        self._warned_label_like = True
        rank_zero_warn(
            f"GradientWeightAlignment: this epoch scored {int(scored)} samples but found only "
            f"{int(distinct)} distinct dataset indices with indices={self.spec!r}: they look "
            f"like labels, not dataset indices, and the per-sample scores are merged wrongly. "
            f"{HOW_TO_INDEX[0].upper()}{HOW_TO_INDEX[1:]}.",
        )

    # ------------------------------------------------------------------ reading
    def sample_scores(self) -> dict[str, Tensor]:
        """See :meth:`GradientWeightAlignment.sample_scores`."""
        self.flush()
        if self.latest is None:
            empty = torch.zeros(0, dtype=torch.float64)
            return {"index": torch.zeros(0, dtype=torch.int64), "score": empty, "epoch_mean": empty}
        latest = self.latest[: self.num_indices].cpu()
        index = torch.nonzero(~torch.isnan(latest)).flatten()
        last = self.last_epoch_mean
        epoch_mean = torch.full((index.numel(),), float("nan"), dtype=torch.float64)
        if last is not None:
            inside = index < last.numel()
            epoch_mean[inside] = last[index[inside]].double()
        return {"index": index, "score": latest[index], "epoch_mean": epoch_mean}

    def score_history(self) -> Tensor:
        """See :meth:`GradientWeightAlignment.score_history`."""
        if not self.history:
            return torch.zeros(0, 0)
        width = max(h.numel() for h in self.history)
        rows = [
            torch.cat([h, torch.full((width - h.numel(),), float("nan"))]) for h in self.history
        ]
        return torch.stack(rows)

    # ------------------------------------------------------------------ state
    def own_copies(self) -> None:
        """Give this process its own copy of the accumulating tensors (``ddp_spawn``)."""
        for attribute in ("latest", "epoch_sum", "epoch_count"):
            value = getattr(self, attribute)
            if value is not None:
                setattr(self, attribute, value.clone())

    def state(self) -> dict[str, Any]:
        """The checkpoint entries (the callback's ``state_dict`` keys)."""
        self.flush()
        return {
            "latest": None if self.latest is None else self.latest.cpu(),
            "epoch_sum": None if self.epoch_sum is None else self.epoch_sum.cpu(),
            "epoch_count": None if self.epoch_count is None else self.epoch_count.cpu(),
            "score_history": list(self.history),
            "score_history_epochs": list(self.history_epochs),
            "num_indices": self.num_indices,
            "last_epoch_mean": self.last_epoch_mean,
        }

    def load_state(self, state: dict[str, Any], recorded_epochs: list[int]) -> None:
        """Load :meth:`state`; ``recorded_epochs``: the epochs of the callback's history, for
        checkpoints written before the history rows carried their epochs."""
        self._pending = []
        self.latest = state.get("latest")
        self.epoch_sum = state.get("epoch_sum")
        self.epoch_count = state.get("epoch_count")
        self.history = list(state.get("score_history", []))
        if "score_history_epochs" in state:
            self.history_epochs = [int(e) for e in state["score_history_epochs"]]
        elif len(self.history) == len(recorded_epochs):
            self.history_epochs = list(recorded_epochs)
        else:
            self.history_epochs = []
        self.num_indices = int(state.get("num_indices", 0))
        if state.get("last_epoch_mean") is not None:
            self.last_epoch_mean = state["last_epoch_mean"]


def lowest(epoch_scores: Tensor, k: int) -> Tensor:
    """``(min(k, M),)`` indices of the ``k`` lowest non-NaN entries of ``(N,)`` scores."""
    seen = torch.nonzero(~torch.isnan(epoch_scores)).flatten()
    order = torch.argsort(epoch_scores[seen], stable=True)[:k]
    return seen[order]
