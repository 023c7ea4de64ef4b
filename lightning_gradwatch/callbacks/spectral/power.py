"""Warm-started power iteration per tracked weight: the singular-vector buffers, the per-layer
iteration counts, and the refinement an exact check triggers."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ...functional.spectral import compute_dtype, init_power_iteration_vectors, power_iteration
from .selection import TrackedWeight


class PowerIterations:
    """The callback's own singular-vector estimates ``u``, ``v`` of every tracked weight, on the
    weight's device, updated without autograd (parameters are only read).

    Args:
        power_iterations: iterations per read.
        max_power_iterations: cap on a layer's per-read iterations after doubling.
        exact_rtol: relative error above which :meth:`refine` iterates further.
        max_refine_iterations: cap on the extra iterations of one refinement.
        seed: seed of the callback's own generator for the starting vectors (the global RNG
            is never touched).
    """

    def __init__(
        self,
        power_iterations: int,
        max_power_iterations: int,
        exact_rtol: float,
        max_refine_iterations: int,
        seed: int,
    ) -> None:
        self.power_iterations = power_iterations
        self.max_power_iterations = max_power_iterations
        self.exact_rtol = exact_rtol
        self.max_refine_iterations = max_refine_iterations
        self.generator = torch.Generator().manual_seed(seed)
        #: name -> ``(rows,)`` left and ``(cols,)`` right singular-vector estimates.
        self.u: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}
        #: name -> iterations per read (doubled by a refinement, up to the cap).
        self.iterations: dict[str, int] = {}
        #: Layers whose vectors are still the random start (never iterated): an exact check
        #: warms them before their first estimate is logged.
        self.fresh: set[str] = set()

    def ensure(self, t: TrackedWeight) -> None:
        """Start vectors for ``t`` unless it has some of the right shape (e.g. from a
        checkpoint of the same model)."""
        rows, cols = t.matrix().shape
        u, v = self.u.get(t.name), self.v.get(t.name)
        if u is None or v is None or u.shape != (rows,) or v.shape != (cols,):
            self.reinit(t)
        self.iterations.setdefault(t.name, self.power_iterations)

    def reinit(self, t: TrackedWeight) -> None:
        """Fresh random start vectors (after a non-finite weight or a collapse to 0)."""
        rows, cols = t.matrix().shape
        dtype = compute_dtype(t.param.dtype)
        self.u[t.name], self.v[t.name] = init_power_iteration_vectors(
            rows, cols, generator=self.generator, device=t.param.device, dtype=dtype
        )
        self.fresh.add(t.name)

    def iterate(self, t: TrackedWeight, matrix: Tensor, n: int) -> Tensor:
        """``n`` warm-started iterations on ``matrix``; returns the ``()`` estimate."""
        u, v = self.u[t.name], self.v[t.name]
        if u.device != matrix.device or u.dtype != matrix.dtype:
            u, v = u.to(matrix.device, matrix.dtype), v.to(matrix.device, matrix.dtype)
        sigma, self.u[t.name], self.v[t.name] = power_iteration(matrix, u, v, n)
        self.fresh.discard(t.name)
        return sigma

    def refine(
        self, t: TrackedWeight, matrix: Tensor, exact: float, iterate: Any, more: bool = True
    ) -> float:
        """Iterate (``iterate(t, matrix, n)``) until the estimate is within ``exact_rtol`` of
        ``exact`` and, with ``more`` (after a failing check; not for warming fresh vectors),
        give the layer twice the iterations per read from now on. Returns the remaining
        relative error (above ``exact_rtol`` when the cap was reached)."""
        if more:
            self.iterations[t.name] = min(2 * self.iterations[t.name], self.max_power_iterations)
        spent, error = 0, math.inf
        while spent < self.max_refine_iterations:
            chunk = min(8, self.max_refine_iterations - spent)
            error = rel_err(float(iterate(t, matrix, chunk)), exact)
            spent += chunk
            if error <= self.exact_rtol:
                break
        return error

    def state_dict(self) -> dict[str, Any]:
        return {
            "u": {k: v.detach().cpu() for k, v in self.u.items()},
            "v": {k: v.detach().cpu() for k, v in self.v.items()},
            "iterations": dict(self.iterations),
            "fresh": sorted(self.fresh),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Loaded vectors stay on the CPU until first use, then move to the weight's device.
        self.u = dict(state.get("u", {}))
        self.v = dict(state.get("v", {}))
        self.iterations = dict(state.get("iterations", {}))
        self.fresh = set(state.get("fresh", []))
        if "generator" in state:
            self.generator.set_state(state["generator"])


def exact_sigma_max(matrix: Tensor) -> float:
    """The exact largest singular value, from the largest eigenvalue of the smaller Gram matrix
    in float64: the same number as ``torch.linalg.matrix_norm(matrix, ord=2)`` to float64
    rounding (the top eigenvalue of ``W W^T`` has relative error of order the float64
    epsilon), at half to a third of an SVD's cost."""
    w = matrix.double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))


def rel_err(estimate: float, exact: float) -> float:
    """``|exact - estimate| / exact`` (``|estimate|`` when the exact value is 0)."""
    if exact == 0.0:
        return abs(estimate)
    return abs(exact - estimate) / exact
