"""The brute-force oracle: one backward pass per sample, in float64."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]  # (output, target) -> (B,) per-sample losses


def per_sample_grads(
    model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, names: list[str]
) -> dict[str, Tensor]:
    """``{name: (B, *shape)}``: for each i, ``l_i.backward()`` alone on one batched forward."""
    params = dict(model.named_parameters())
    losses = loss_fn(model(inputs), targets)
    out = {n: [] for n in names}
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(
            losses[i], [params[n] for n in names], retain_graph=True, allow_unused=True
        )
        for n, g in zip(names, grads, strict=True):
            out[n].append(torch.zeros_like(params[n]) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


def expected_stats(
    model: nn.Module, grads: dict[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """``dot``, ``sq_norm`` and ``sum_sq`` from materialised per-sample gradients."""
    params = dict(model.named_parameters())
    dot = {n: (g.flatten(1) * params[n].detach().reshape(-1)).sum(1) for n, g in grads.items()}
    sq = {n: g.flatten(1).pow(2).sum(1) for n, g in grads.items()}
    sum_sq = {n: g.pow(2).sum(0) for n, g in grads.items()}
    return dot, sq, sum_sq


def reduce(losses: Tensor, reduction: str) -> Tensor:
    return losses.mean() if reduction == "mean" else losses.sum()
