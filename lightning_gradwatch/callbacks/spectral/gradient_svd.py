"""Spectra of the tracked layers' batch gradients, read just before the optimizer step."""

from __future__ import annotations

import torch
from torch import Tensor

from ...functional.spectral import as_matrix, compute_dtype, gradient_spectrum
from .selection import TrackedWeight

#: The per-layer quantities of a gradient read, in the order of :func:`gradient_spectra`.
GRADIENT_QUANTITIES = ("grad_sigma_max", "grad_nuclear_norm", "grad_effective_rank")


def layers_with_gradients(
    tracked: list[TrackedWeight], optimizer: torch.optim.Optimizer
) -> list[TrackedWeight]:
    """The tracked plain (not reparametrized) weights this optimizer updates that have a
    ``.grad``."""
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [
        t
        for t in tracked
        if t.effective is None and id(t.param) in in_optimizer and t.param.grad is not None
    ]


def gradient_spectra(layers: list[TrackedWeight]) -> Tensor | None:
    """``(L, 3)`` float64 on the CPU: ``sigma_max``, nuclear norm and effective rank of each
    layer's gradient matrix (full SVD), or ``None`` when a gradient is not finite (e.g. an AMP
    overflow step, which the GradScaler skips). One device-to-host transfer.

    Reads ``.grad`` after AMP unscaling, DDP's all-reduce and gradient accumulation, before
    gradient clipping; never writes it.
    """
    with torch.no_grad():
        grads = []
        for t in layers:
            grad = t.param.grad.detach()  # type: ignore[union-attr]
            if grad.is_sparse:
                grad = grad.to_dense()
            grads.append(as_matrix(grad.to(compute_dtype(grad.dtype)), t.output_dim))
        finite = torch.stack([torch.isfinite(g).all().to(grads[0].device) for g in grads]).all()
        if not bool(finite):
            return None
        rows = [torch.stack(gradient_spectrum(g)).double().to(grads[0].device) for g in grads]
        return torch.stack(rows).cpu()
