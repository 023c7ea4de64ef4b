"""Aggregators for gradient noise statistics: per-sample sums over micro-batches and ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from .._lightning import mark_metric_loaded, reset_metric_in_place


def all_reduce_sum(tensor: Tensor, group: Any | None = None) -> list[Tensor]:
    """A torchmetrics ``dist_sync_fn`` that sums with one ``all_reduce`` per state.

    torchmetrics' default ``all_gather`` moves ``world_size`` copies of every state to every
    rank; for states reduced by ``"sum"`` an ``all_reduce`` gives the same result with a
    ring all-reduce's traffic of about two copies per rank. Returns a one-element list, which
    torchmetrics stacks and sums (a no-op).
    """
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return [reduced]


class NoiseSums(NamedTuple):
    """Sums over the ``count`` samples of one optimizer step (global after ``compute``).

    Attributes:
        grad_sum: ``(D,)`` ``sum_i g_i``, all tracked parameters flattened and concatenated.
        grad_sq_sum: ``(D,)`` ``sum_i g_i**2``.
        sample_sq_norm_sum: ``(L,)`` per layer ``sum_i |g_i|^2``.
        layer_count: ``(L,)`` samples that contributed to each layer (a layer left out of
            some backward pass has fewer than ``count``).
        count: ``()`` number of samples ``B``.
        nonfinite: ``()`` backward passes with non-finite statistics.
    """

    grad_sum: Tensor
    grad_sq_sum: Tensor
    sample_sq_norm_sum: Tensor
    layer_count: Tensor
    count: Tensor
    nonfinite: Tensor


class GradientNoiseSums(Metric):
    """Accumulates the per-sample sums that gradient noise statistics need.

    Feed it every micro-batch of one optimizer step (``update``), then ``compute`` gives the
    sums over the effective batch, all-reduced across DDP ranks (every state is a sum, synced
    with :func:`all_reduce_sum`: ``2 D + 2 L + 2`` numbers per sync for ``D`` parameter
    entries in ``L`` layers). ``reset`` before the next step.

    Example::

        >>> import torch
        >>> sums = GradientNoiseSums({"w": 3})
        >>> g = torch.randn(4, 3)  # four per-sample gradients
        >>> sums.update({"w": g.sum(0)}, {"w": g.pow(2).sum(0)}, {"w": g.pow(2).sum(1)}, 4)
        >>> int(sums.compute().count)
        4

    Args:
        layer_sizes: parameter name to number of entries, in a fixed order (the layout of
            the flat states; identical on every rank).
        dtype: floating dtype of the sums.
        kwargs: passed to :class:`torchmetrics.Metric` (``dist_sync_fn`` defaults to
            :func:`all_reduce_sum`).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    grad_sum: Tensor
    grad_sq_sum: Tensor
    sample_sq_norm_sum: Tensor
    layer_count: Tensor
    count: Tensor
    nonfinite: Tensor

    def __init__(
        self, layer_sizes: Mapping[str, int], dtype: torch.dtype = torch.float32, **kwargs: Any
    ) -> None:
        kwargs.setdefault("dist_sync_fn", all_reduce_sum)
        super().__init__(**kwargs)
        if not layer_sizes:
            raise ValueError("GradientNoiseSums needs at least one parameter in layer_sizes")
        self.layer_names = list(layer_sizes)
        self.layer_sizes = [int(layer_sizes[n]) for n in self.layer_names]
        self._index = {n: k for k, n in enumerate(self.layer_names)}
        offsets = [0]
        for size in self.layer_sizes:
            offsets.append(offsets[-1] + size)
        self.layer_offsets = offsets
        entries, layers = offsets[-1], len(self.layer_names)
        self.add_state("grad_sum", torch.zeros(entries, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("grad_sq_sum", torch.zeros(entries, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("sample_sq_norm_sum", torch.zeros(layers, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("layer_count", torch.zeros(layers, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("nonfinite", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        # Set by restart(): the (D,) states hold stale values that count as zero, and the next
        # update overwrites them.
        self._restarted = False

    def layer_slice(self, name: str) -> slice:
        """Where parameter ``name`` lives in the flat ``(D,)`` states."""
        k = self._index[name]
        return slice(self.layer_offsets[k], self.layer_offsets[k + 1])

    def update(
        self,
        grad_sum: Mapping[str, Tensor],
        grad_sq_sum: Mapping[str, Tensor],
        sample_sq_norm: Mapping[str, Tensor],
        batch_size: int,
        finite: bool | Tensor = True,
    ) -> None:
        """Add one backward pass.

        Args:
            grad_sum: name to param-shaped ``sum_i g_i`` over this pass's samples.
            grad_sq_sum: name to param-shaped ``sum_i g_i**2``.
            sample_sq_norm: name to ``(b,)`` ``|g_i|^2``.
            batch_size: ``b``, the samples in this pass.
            finite: ``False`` records a non-finite pass (the other arguments are ignored);
                ``compute`` then reports it in ``nonfinite`` on every rank. A ``()`` bool
                tensor is counted on the device, with no host synchronisation; the pass's
                sums are added either way, and a consumer must discard a step whose
                ``nonfinite`` is not 0.
        """
        if isinstance(finite, Tensor):
            self.nonfinite += (~finite).to(self.nonfinite.dtype).to(self.nonfinite.device)
        elif not finite:
            self.nonfinite += 1
            return
        self.count += batch_size
        dtype = self.grad_sum.dtype
        overwrite, self._restarted = self._restarted, False
        present = [
            (name, k)
            for name, k in self._index.items()
            # A layer left out of this pass: its layer_count falls short of count.
            if name in grad_sum and name in grad_sq_sum and name in sample_sq_norm
        ]
        if overwrite and len(present) < len(self._index):
            overwrite = False  # some slices would stay stale: zero everything, then add
            self.grad_sum.zero_()
            self.grad_sq_sum.zero_()
        if not present:
            return
        # One fused add (or copy, after restart) per state over every layer, rather than a
        # few kernels per layer.
        targets, sources = [], []
        for name, _ in present:
            where = self.layer_slice(name)
            targets += [self.grad_sum[where], self.grad_sq_sum[where]]
            sources += [
                grad_sum[name].reshape(-1).to(dtype),
                grad_sq_sum[name].reshape(-1).to(dtype),
            ]
        if overwrite:
            torch._foreach_copy_(targets, sources)
        else:
            torch._foreach_add_(targets, sources)
        per_sample = [sample_sq_norm[name] for name, _ in present]
        if len({(t.shape, t.dtype, t.device) for t in per_sample}) == 1:
            # One (L, b) stack and one reduction rather than a sum per layer (each a kernel).
            norms = torch.stack(per_sample).sum(1).to(dtype)
        else:
            norms = torch.stack([t.sum().to(dtype) for t in per_sample])
        if len(present) == len(self._index):
            self.sample_sq_norm_sum += norms
            self.layer_count += batch_size
        else:  # rare: indexed one by one (an index tensor would be a host-to-device copy)
            for j, (_, k) in enumerate(present):
                self.sample_sq_norm_sum[k] += norms[j]
                self.layer_count[k] += batch_size

    def zero_(self) -> None:
        """:meth:`reset`, but zeroing the states in place instead of allocating fresh copies of
        them (two ``(D,)`` tensors per optimizer step for a callback that resets every step).

        Tensors returned by an earlier :meth:`compute` on a single process are the states
        themselves, so they read zero afterwards: consume them before calling this.
        """
        self._restarted = False
        reset_metric_in_place(self)

    def restart(self) -> None:
        """:meth:`zero_` for the start of a step, without a pass over the two ``(D,)`` states:
        the next :meth:`update` that has every layer copies into them instead of adding (one
        pass where zeroing and adding take two). Until then they read as zero to
        :meth:`compute` and :meth:`synced`.

        Tensors returned by an earlier :meth:`compute` or :meth:`synced` on a single process
        are the states themselves: consume them before the next update.
        """
        mark_metric_loaded(self, updated=False)  # drop a cached compute() result
        for state in (self.sample_sq_norm_sum, self.layer_count, self.count, self.nonfinite):
            state.zero_()
        self._restarted = True

    def _settle(self) -> None:
        """Zero the ``(D,)`` states if :meth:`restart` left them stale (no update since)."""
        if self._restarted:
            self._restarted = False
            self.grad_sum.zero_()
            self.grad_sq_sum.zero_()

    def compute(self) -> NoiseSums:
        """The sums (over all ranks when distributed)."""
        self._settle()
        return self._states()

    def synced(self) -> NoiseSums:
        """What :meth:`compute` gives, without torchmetrics' wrapper around it, which copies
        every state (two ``(D,)`` copies and their allocation per optimizer step, several
        times the arithmetic that reads them). Synced across ranks the same way (every state
        all-reduced with ``dist_sync_fn``), after which the states hold the local sums
        again; on one process the returned tensors are the states themselves, so consume them
        before :meth:`zero_`."""
        self._settle()
        with self.sync_context(dist_sync_fn=self.dist_sync_fn):
            return self._states()

    def _states(self) -> NoiseSums:
        return NoiseSums(
            self.grad_sum,
            self.grad_sq_sum,
            self.sample_sq_norm_sum,
            self.layer_count,
            self.count,
            self.nonfinite,
        )


class RatioEMA(Metric):
    """Exponential moving averages of a numerator and a denominator, and their ratio.

    McCandlish et al. smooth the gradient noise scale by averaging ``tr(Sigma)`` and
    ``|G|^2`` separately before dividing, because the ratio of noisy estimates is biased
    and heavy-tailed. The first update sets both averages; each later one does
    ``ema = decay * ema + (1 - decay) * value``. The inputs are already global (identical on
    every rank), so nothing is synced; the states are persistent so ``state_dict`` carries
    them.

    Example::

        >>> import torch
        >>> ema = RatioEMA(decay=0.5)
        >>> ema.update(torch.tensor(2.0), torch.tensor(1.0))
        >>> ema.update(torch.tensor(4.0), torch.tensor(1.0))
        >>> float(ema.compute())
        3.0

    Args:
        decay: weight of the past, in ``[0, 1)``.
    """

    full_state_update = True
    is_differentiable = False
    higher_is_better = None

    numerator: Tensor
    denominator: Tensor
    updates: Tensor

    def __init__(self, decay: float = 0.9, **kwargs: Any) -> None:
        kwargs.setdefault("sync_on_compute", False)
        super().__init__(**kwargs)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        zero = torch.zeros((), dtype=torch.float64)
        self.add_state("numerator", zero.clone(), dist_reduce_fx=None, persistent=True)
        self.add_state("denominator", zero.clone(), dist_reduce_fx=None, persistent=True)
        self.add_state(
            "updates", torch.zeros((), dtype=torch.long), dist_reduce_fx=None, persistent=True
        )

    def update(self, numerator: Tensor, denominator: Tensor) -> None:
        """Fold in one step's numerator and denominator (scalars)."""
        decay = torch.full_like(self.numerator, self.decay)
        weight = torch.where(self.updates > 0, decay, torch.zeros_like(decay))
        numerator = torch.as_tensor(numerator).to(self.numerator)
        denominator = torch.as_tensor(denominator).to(self.denominator)
        self.numerator = weight * self.numerator + (1 - weight) * numerator
        self.denominator = weight * self.denominator + (1 - weight) * denominator
        self.updates = self.updates + 1

    def compute(self) -> Tensor:
        """``()`` smoothed numerator over smoothed denominator."""
        return self.numerator / self.denominator

    def update_where(self, valid: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
        """:meth:`update` where ``valid`` (a ``()`` bool tensor) is true, nothing otherwise,
        decided on the device (no host read); returns :meth:`compute`. The same arithmetic as
        :meth:`update`, in about half its kernels (this runs on every computed step).
        """
        # 1.0 * decay and 0.0 * decay are exactly the weights update() selects.
        weight = (self.updates > 0).to(self.numerator.dtype) * self.decay
        rest = 1 - weight
        numerator = torch.as_tensor(numerator).to(self.numerator)
        denominator = torch.as_tensor(denominator).to(self.denominator)
        self.numerator = torch.where(
            valid, weight * self.numerator + rest * numerator, self.numerator
        )
        self.denominator = torch.where(
            valid, weight * self.denominator + rest * denominator, self.denominator
        )
        self.updates = self.updates + valid
        mark_metric_loaded(self, updated=True)  # what update() records, for compute()
        return self.numerator / self.denominator
