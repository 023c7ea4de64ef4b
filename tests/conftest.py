"""Shared helpers for the probe tests: run the probe once, and compare it with the oracle.

Tolerance: every per-sample quantity is compared with the float64 brute-force oracle at
``rtol=1e-6``; the absolute tolerance is ``1e-9`` times the largest magnitude of the expected
tensor (plus ``1e-12``), so entries that are exactly zero in exact arithmetic (padding rows,
samples that do not reach a parameter) compare sensibly.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from oracle import expected_stats, per_sample_grads, reduce
from torch import Tensor, nn

from lightning_gradwatch import GradientProbe, ProbeStats

RTOL = 1e-6


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with ``tmp_path`` as the working directory, so a Trainer or logger left
    at its default ``default_root_dir`` (the working directory) writes ``checkpoints/`` and
    ``lightning_logs/`` there and never into the repository; temporary files and directories
    (``tempfile``, here and in subprocesses through ``TMPDIR``) go under it too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))


#: Devices to run device-agnostic tests on: the CPU, plus CUDA where available.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

LossFn = Callable[[Any, Tensor], Tensor]


def partial_backward(loss: Tensor, inputs: list[Tensor], how: str) -> None:
    """A backward that runs only the graph on a path to ``inputs``: ``loss.backward(inputs=...)``
    (``how="backward"``) or ``torch.autograd.grad(loss, inputs)`` (``"autograd.grad"``)."""
    if how == "backward":
        loss.backward(inputs=inputs)
    else:
        torch.autograd.grad(loss, inputs)


def squared_error(out: Any, target: Tensor) -> Tensor:
    """``(B,)`` per-sample loss ``sum (out - target)**2`` over everything but the batch dim.

    Tuples (e.g. ``nn.MultiheadAttention``'s ``(output, weights)``) use their first element.
    """
    if isinstance(out, tuple):
        out = out[0]
    return (out - target).pow(2).flatten(1).sum(1)


def assert_close(actual: Tensor, expected: Tensor, what: str, rtol: float = RTOL) -> None:
    """``actual`` matches ``expected`` at ``rtol`` (see the module docstring for ``atol``)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    expected = expected.to(actual.dtype)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    # An entry that is a sum with cancellation carries the rounding of the largest terms, so the
    # absolute floor scales with the largest entry: 1e-9 of it in float64, and 32 machine
    # epsilons in lower precisions (float32 sums of a few hundred terms, two code paths that
    # round differently: measured up to ~16 eps).
    floor = max(1e-9, 32 * torch.finfo(actual.dtype).eps) if actual.is_floating_point() else 0.0
    torch.testing.assert_close(
        actual,
        expected,
        rtol=rtol,
        atol=floor * scale + 1e-12,
        msg=lambda m: f"{what}: {m}",
    )


def run_probe(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    loss_fn: LossFn = squared_error,
    reduction: str = "mean",
    loss_multiplier: float = 1.0,
    **probe_kwargs: Any,
) -> ProbeStats:
    """One forward and backward inside ``with probe:``; returns ``probe.stats``.

    ``loss_multiplier`` scales the reduced loss before ``backward`` (AMP-style loss scaling);
    pass the matching ``loss_scale`` in ``probe_kwargs``.
    """
    probe = GradientProbe(model, loss_reduction=reduction, **probe_kwargs)
    with probe:
        loss = reduce(loss_fn(model(inputs), targets), reduction) * loss_multiplier
        loss.backward()
    model.zero_grad(set_to_none=True)
    return probe.stats


def assert_alignment_close(
    stats: ProbeStats,
    names: list[str],
    dot: dict[str, Tensor],
    sq: dict[str, Tensor],
    params: dict[str, Tensor],
    rtol: float = RTOL,
) -> None:
    """``stats.alignment(names)`` against ``cos(-g_i, theta)`` from the oracle's gradients.

    A sample whose gradient is zero in exact arithmetic (e.g. a GroupNorm group holding one
    value, whose ``xhat`` is 0) has an undefined direction: the oracle's rounding noise there
    (``|g_i|^2`` below ``1e-20`` of the batch's largest) is not compared; its ``sq_norm`` is
    still checked to be ~0.
    """
    expected_dot = torch.stack([dot[n] for n in names]).sum(0)
    expected_sq = torch.stack([sq[n] for n in names]).sum(0)
    weight_sq = sum(params[n].detach().double().pow(2).sum() for n in names)
    denom = (expected_sq * weight_sq).sqrt()
    expected = torch.where(
        denom > 0, -expected_dot / denom.clamp_min(1e-300), torch.zeros_like(expected_dot)
    )
    defined = expected_sq > 1e-20 * expected_sq.max().clamp_min(1e-300)
    actual = stats.alignment(names)
    assert actual.shape == expected.shape
    assert_close(actual[defined], expected[defined], f"alignment{names}", rtol)


def assert_matches_oracle(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    loss_fn: LossFn = squared_error,
    reduction: str = "mean",
    names: list[str] | None = None,
    rtol: float = RTOL,
    **probe_kwargs: Any,
) -> ProbeStats:
    """Run the probe (with ``sum_grad_squared=True``) and compare every statistic of every
    tracked parameter (``names``, default all) with the per-sample loop."""
    probe_kwargs.setdefault("sum_grad_squared", True)
    stats = run_probe(model, inputs, targets, loss_fn, reduction, **probe_kwargs)
    params = dict(model.named_parameters())
    if names is None:
        names = probe_kwargs.get("params") or [n for n, p in params.items() if p.requires_grad]
    names = list(names)
    assert sorted(stats.names) == sorted(names), (stats.names, stats.excluded)

    grads = per_sample_grads(model, loss_fn, inputs, targets, names)
    model.zero_grad(set_to_none=True)
    dot, sq, sum_sq = expected_stats(model, grads)
    batch = next(iter(grads.values())).shape[0]
    assert stats.batch_size == batch
    for n in names:
        assert_close(stats.dot[n], dot[n], f"dot[{n}]", rtol)
        assert_close(stats.sq_norm[n], sq[n], f"sq_norm[{n}]", rtol)
        assert_close(
            stats.param_sq_norm[n], params[n].detach().double().pow(2).sum(), f"|{n}|^2", rtol
        )
        if probe_kwargs["sum_grad_squared"]:
            assert_close(stats.sum_sq[n], sum_sq[n], f"sum_sq[{n}]", rtol)
            assert_close(stats.grad_sum[n], grads[n].sum(0), f"grad_sum[{n}]", rtol)
        assert_alignment_close(stats, [n], dot, sq, params, rtol)
    assert_alignment_close(stats, names, dot, sq, params, rtol)
    assert_close(stats.grad_sq_norm(names), sum(sq[n] for n in names), "grad_sq_norm", rtol)
    return stats
