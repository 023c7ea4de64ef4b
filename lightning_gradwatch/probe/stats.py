"""The result of one probed backward pass."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..functional.alignment import cosine_alignment


@dataclass
class ProbeStats:
    """Per-sample gradient statistics of one backward pass.

    Keys are parameter names as in ``model.named_parameters()``. ``g_i`` is the gradient of
    sample ``i``'s own, unscaled loss (the probe removes the batch reduction and any loss
    scale).

    Attributes:
        batch_size: ``B``.
        dot: name to ``(B,)`` ``<g_i, theta>``.
        sq_norm: name to ``(B,)`` ``|g_i|^2``.
        sum_sq: name to ``param.shape`` ``sum_i g_i**2`` (only with ``sum_grad_squared``).
        grad_sum: name to ``param.shape`` ``sum_i g_i`` over the probed samples (only with
            ``sum_grad_squared``): autograd's own gradient of the backward where that is
            exactly this sum (float32/float64, every use inside the owning modules), else
            formed from the same per-sample values as ``sum_sq``.
        param_sq_norm: name to ``()`` ``|theta|^2`` at the time of the backward.
        excluded: name to the reason it has no statistics this step (e.g. BatchNorm in
            training mode).

    Whether the statistics are finite (an AMP overflow step makes them NaN or Inf) is
    available two ways: :attr:`finite`, a ``()`` bool tensor on the statistics' device that
    consumers combine with ``torch.where`` without leaving the device, and
    :meth:`is_finite`, the same as a Python ``bool`` (one host-device synchronisation, for
    code that reads it on logging steps only).
    """

    batch_size: int
    dot: dict[str, Tensor] = field(default_factory=dict)
    sq_norm: dict[str, Tensor] = field(default_factory=dict)
    sum_sq: dict[str, Tensor] = field(default_factory=dict)
    grad_sum: dict[str, Tensor] = field(default_factory=dict)
    param_sq_norm: dict[str, Tensor] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    _finite: bool | None = field(default=None, repr=False, compare=False)
    _finite_tensor: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        """Parameters with statistics this step."""
        return list(self.dot)

    def _select(self, names: Iterable[str] | None) -> list[str]:
        if names is None:
            return self.names
        names = list(names)
        missing = [n for n in names if n not in self.dot]
        if missing:
            reasons = {n: self.excluded.get(n, "not tracked by the probe") for n in missing}
            raise KeyError(f"no per-sample statistics for {reasons}")
        return names

    def grad_sq_norm(self, names: Iterable[str] | None = None) -> Tensor:
        """``(B,)`` squared norm of ``g_i`` restricted to ``names`` (all if None)."""
        selected = self._select(names)
        return torch.stack([self.sq_norm[n] for n in selected]).sum(0)

    def alignment(self, names: Iterable[str] | None = None) -> Tensor:
        """``(B,)`` ``cos(-g_i, theta)`` with ``theta`` the concatenation of ``names``."""
        selected = self._select(names)
        if len(selected) == 1:  # the common case (a head): no stacking
            (name,) = selected
            return cosine_alignment(self.dot[name], self.sq_norm[name], self.param_sq_norm[name])
        dot = torch.stack([self.dot[n] for n in selected]).sum(0)
        weight_sq = torch.stack([self.param_sq_norm[n] for n in selected]).sum(0)
        return cosine_alignment(dot, self.grad_sq_norm(selected), weight_sq)

    def _statistic_tensors(self) -> list[Tensor]:
        return [*self.dot.values(), *self.sq_norm.values(), *self.sum_sq.values()]

    @property
    def finite(self) -> Tensor:
        """``()`` bool tensor: ``False`` when any statistic holds NaN or Inf. Stays on the
        statistics' device (no synchronisation); ``True`` on the CPU when there are no
        statistics."""
        if self._finite_tensor is None:
            if not self._statistic_tensors():
                self._finite_tensor = torch.ones((), dtype=torch.bool)
            else:
                # A NaN or Inf anywhere makes the total non-finite, and finite float32 values
                # summed in float64 cannot overflow. The (B,) vectors are summed as one (a
                # few kernels per step rather than two per parameter). A sum of squares has
                # no negative entry, so its largest entry is finite exactly when all are
                # (amax propagates NaN); that is one float32 pass, without a float64 one.
                rows = torch.cat([*self.dot.values(), *self.sq_norm.values()])
                totals = [rows.sum(dtype=torch.float64)]
                totals += [
                    t.amax().to(torch.float64) if t.numel() else t.sum(dtype=torch.float64)
                    for t in self.sum_sq.values()
                ]
                total = totals[0] if len(totals) == 1 else torch.stack(totals).sum()
                self._finite_tensor = total.isfinite()
        return self._finite_tensor

    def is_finite(self) -> bool:
        """False when any statistic holds NaN or Inf (e.g. an AMP overflow step). Reads
        :attr:`finite` to the host: one synchronisation on an accelerator, cached."""
        if self._finite is None:
            self._finite = bool(self.finite)
        return self._finite


def finite_flags(batches: Sequence[ProbeStats]) -> Tensor:
    """``(K,)`` bool: :attr:`ProbeStats.finite` of each of ``K`` backward passes' statistics
    (each with statistics, all on one device), computed together where it is not computed
    yet, and cached in each.

    The flags are the same as each one's own :attr:`~ProbeStats.finite`: whether the float64
    sum of its statistics is finite. Statistics that hold only ``(B,)`` vectors (no
    ``sum_sq``) of one length per pass are summed as the rows of one ``(K, L)`` tensor: a
    few kernels for all of them, which is why consumers that can wait (the probe's count of
    skipped passes, the GWA epoch aggregate) keep the statistics and ask for the flags later.
    """
    todo = [s for s in batches if s._finite_tensor is None and not s.sum_sq and s.dot]
    if len(todo) > 1:
        vectors = [[*s.dot.values(), *s.sq_norm.values()] for s in todo]
        lengths = {sum(v.shape[0] for v in vs) for vs in vectors}
        if len(lengths) == 1:
            (length,) = lengths
            rows = torch.cat([v for vs in vectors for v in vs]).view(len(todo), length)
            flags = rows.sum(1, dtype=torch.float64).isfinite()
            for s, flag in zip(todo, flags.unbind(), strict=True):
                s._finite_tensor = flag
            if len(todo) == len(batches):
                return flags
    return torch.stack([s.finite for s in batches])


def flag_holder(stats: ProbeStats) -> ProbeStats:
    """What to keep of ``stats`` for :func:`finite_flags`: ``stats`` itself when it holds only
    ``(B,)`` vectors; with parameter-sized sums (``sum_sq``), which are not to be held, a
    stand-in with its flag computed now."""
    if not stats.sum_sq:
        return stats
    return ProbeStats(batch_size=stats.batch_size, _finite_tensor=stats.finite)


class NonfiniteCount:
    """How many backward passes had non-finite statistics, counted without waiting for the
    device. Statistics of ``(B,)`` vectors only are held and their flags computed together
    every ``check_together`` passes (:func:`finite_flags`); a pass with parameter-sized sums
    (``sum_sq``, not to be held) adds its flag to a device count of finite passes with one
    in-place kernel, the skipped ones derived from the number of passes. Only :attr:`value`
    reads the count to the host; ``bool()`` says whether anything is not read yet.

    Args:
        check_together: passes held at most before their flags are computed (bounds memory).
    """

    def __init__(self, check_together: int = 64) -> None:
        self.check_together = check_together
        self._read = 0
        self._pending: Tensor | None = None  # a device count, not yet read
        self._held: list[ProbeStats] = []
        self._held_device: torch.device | None = None  # the device of every held pass
        self._finite: Tensor | None = None  # finite passes among the last `_passes`
        self._passes = 0

    def __bool__(self) -> bool:
        return bool(self._held) or self._finite is not None or self._pending is not None

    def add(self, stats: ProbeStats) -> None:
        """Count ``stats`` if not finite; a pass without statistics counts as finite."""
        if stats.sum_sq:
            finite = stats.finite
            if self._finite is None or self._finite.device != finite.device:
                self._fold()
                self._finite = torch.zeros((), dtype=torch.int64, device=finite.device)
            self._finite.add_(finite)
            self._passes += 1
            return
        if not stats.dot:
            return
        device = _device(stats)
        if self._held and device != self._held_device:
            self._fold()  # flags are computed together on one device only
        self._held.append(stats)
        self._held_device = device
        if len(self._held) >= self.check_together:
            self._fold()

    def _fold(self) -> None:
        if self._finite is not None:
            finite, self._finite = self._finite, None
            self.add_count(self._passes - finite)
            self._passes = 0
        if self._held:
            nonfinite = finite_flags(self._held).logical_not().sum()
            self._held = []
            self.add_count(nonfinite)

    def add_count(self, count: Tensor) -> None:
        """Add ``count`` (a ``()`` tensor: a bool flag or an integer) without reading it."""
        count = count.detach().to(torch.int64)
        if self._pending is not None and self._pending.device != count.device:
            self._read += int(self._pending)
            self._pending = None
        self._pending = count if self._pending is None else self._pending + count

    @property
    def value(self) -> int:
        """The count (one host-device synchronisation when passes are pending)."""
        self._fold()
        if self._pending is not None:
            self._read += int(self._pending)
            self._pending = None
        return self._read

    @value.setter
    def value(self, count: int) -> None:
        self._read, self._pending, self._held = int(count), None, []
        self._finite, self._passes = None, 0


def _device(stats: ProbeStats) -> torch.device:
    return next(iter(stats.dot.values())).device
