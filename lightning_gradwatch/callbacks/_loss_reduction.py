"""Measuring how ``training_step`` reduces the per-sample losses: a mean or a sum.

The probe sees ``c * dl_i/dz`` in every backprop, where the loss is ``L = c * sum_i l_i``, and
from one backward's hooks alone ``c`` cannot be told apart from a scale inside every ``l_i``:
the per-sample gradients the probe forms sum to exactly the ``.grad`` autograd accumulates,
whatever ``c`` is assumed. So the reduction is measured on the loss itself: ``training_step``
is evaluated, without gradients, on the first batch of ``B`` samples, on that batch repeated
twice (``2B`` samples), and on its two halves. A mean over samples gives the same loss on the
repeated batch and the size-weighted mean of the halves' losses; a sum gives twice the loss and
the sum of the halves' losses. Anything else means the loss is not of the form
``c * sum_i l_i`` with ``c`` in ``{1/B, 1}``: it mixes samples (the halves catch statistics of
the batch, such as centring by its mean, which repeating the batch leaves unchanged), or it is
normalised by something else, and per-sample statistics would be wrong.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from .._lightning import apply_to_collection, train_step_context
from ..probe.probe import LossReduction

#: Largest relative tolerance on the ratio at which a decision is still made: above it, the
#: two hypotheses (ratios 1 and 2) are no longer safely apart from a sample-mixing loss.
MAX_RATIO_TOLERANCE = 0.25

#: Tolerance in units of the precision's machine epsilon: the two evaluations add ``B`` and
#: ``2B`` per-sample losses, each rounded in the compute dtype, in different orders.
EPS_FACTOR = 4.0

#: Floor of the tolerance: float32 and float64 sums of up to millions of terms agree to this.
MIN_RATIO_TOLERANCE = 1e-4

#: Margin over the measured run-to-run variation of the loss (dropout and other randomness).
NOISE_FACTOR = 3.0


@dataclass(frozen=True)
class ReductionMeasurement:
    """The outcome of :func:`measure_loss_reduction`.

    Attributes:
        batch_size: ``B``, the first dimension shared by the batch's tensors.
        loss: ``()`` loss on the batch.
        doubled_loss: loss on the batch repeated twice.
        halves_loss: the loss on the batch as the hypothesis ``verdict`` predicts it from the
            losses on the two halves (``nan`` for a batch of one sample).
        noise: relative change of the loss between two evaluations on the same batch with
            different random numbers (0 for a deterministic model).
        tolerance: relative tolerance on the ratio (from the precision and ``noise``).
        verdict: ``"mean"``, ``"sum"`` or ``None`` when neither fits.
        reason: why there is no verdict (``""`` otherwise).
    """

    batch_size: int
    loss: float
    doubled_loss: float
    halves_loss: float
    noise: float
    tolerance: float
    verdict: LossReduction | None
    reason: str = ""

    @property
    def ratio(self) -> float:
        """``doubled_loss / loss``: 1 for a mean over samples, 2 for a sum."""
        return self.doubled_loss / self.loss

    def describe(self) -> str:
        """One sentence with the numbers, for messages."""
        return (
            f"evaluated without gradients on the first batch of {self.batch_size} samples and "
            f"on that batch repeated twice ({2 * self.batch_size} samples), the loss went from "
            f"{self.loss:.6g} to {self.doubled_loss:.6g}, a ratio of {self.ratio:.4f} (a mean "
            f"over samples gives 1, a sum 2, here within a relative {self.tolerance:.2g})"
            + (
                f"; from its two halves the loss would be {self.halves_loss:.6g}"
                if math.isfinite(self.halves_loss)
                else ""
            )
        )


def precision_eps(trainer: pl.Trainer) -> float:
    """Machine epsilon of the dtype the trainer's precision computes in."""
    precision = str(trainer.precision)
    if "bf16" in precision:
        return torch.finfo(torch.bfloat16).eps
    if precision.startswith("16"):
        return torch.finfo(torch.float16).eps
    if precision.startswith("64"):
        return torch.finfo(torch.float64).eps
    return torch.finfo(torch.float32).eps


def _sample_count(batch: Any) -> int | None:
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def _loss_of(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    return None


@contextmanager
def _side_effects_undone(pl_module: pl.LightningModule) -> Iterator[None]:
    """Leaves no trace of extra ``training_step`` calls: random number generators, module
    buffers (BatchNorm running statistics) and train/eval modes are restored, and
    ``self.log``/``self.log_dict`` do nothing inside."""
    modes = [(m, m.training) for m in pl_module.modules()]
    buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]
    python_state = random.getstate()
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        pl_module.log = _ignore  # type: ignore[method-assign]
        pl_module.log_dict = _ignore  # type: ignore[method-assign]
        try:
            yield
        finally:
            del pl_module.log, pl_module.log_dict  # back to the class's methods
            random.setstate(python_state)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for module, mode in modes:
                module.training = mode


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def measure_loss_reduction(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
) -> ReductionMeasurement | None:
    """Evaluate ``training_step`` on ``batch`` and on ``batch`` repeated twice, and decide.

    Every tensor of the batch whose first dimension equals ``B`` (that of the first tensor) is
    repeated (or split); other leaves are passed unchanged. Five evaluations, all without
    gradients and with no side effect left behind: the batch twice with different random
    numbers (their difference measures dropout-like noise, which widens the tolerance), then,
    from the first evaluation's random numbers, the repeated batch and the two halves.

    Returns:
        The measurement, or ``None`` when this batch cannot decide (``training_step`` returned
        no loss, or a zero or non-finite one): try the next batch.
    """
    batch_size = _sample_count(batch)
    if batch_size is None or batch_size == 0:
        return None

    def samples(transform: Any) -> Any:
        return apply_to_collection(
            batch,
            Tensor,
            lambda t: transform(t) if t.dim() > 0 and t.shape[0] == batch_size else t,
        )

    doubled = samples(lambda t: torch.cat([t, t]))
    split = (batch_size + 1) // 2
    halves = [samples(lambda t: t[:split]), samples(lambda t: t[split:])] if batch_size > 1 else []
    with torch.no_grad(), _side_effects_undone(pl_module):
        rng_state = torch.random.get_rng_state()
        cuda_state = torch.cuda.get_rng_state() if pl_module.device.type == "cuda" else None
        with train_step_context(trainer):
            first = _loss_of(pl_module.training_step(batch, batch_idx))
            second = _loss_of(pl_module.training_step(batch, batch_idx))
        torch.random.set_rng_state(rng_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)
        with train_step_context(trainer):
            twice = _loss_of(pl_module.training_step(doubled, batch_idx))
            parts = [_loss_of(pl_module.training_step(half, batch_idx)) for half in halves]
    losses = [first, second, twice, *parts]
    if any(loss is None for loss in losses):
        return None
    # One read, once per fit.
    values = torch.stack([loss.detach().double().reshape(()) for loss in losses]).tolist()
    if not all(map(math.isfinite, values)) or values[0] == 0.0:
        return None
    loss, again, doubled_loss = values[:3]
    sizes = (split, batch_size - split)
    half_losses = values[3:]
    noise = abs(again - loss) / abs(loss)
    tolerance = max(MIN_RATIO_TOLERANCE, EPS_FACTOR * precision_eps(trainer)) + NOISE_FACTOR * noise
    ratio = doubled_loss / loss
    verdict: LossReduction | None = None
    halves_loss = math.nan
    reason = ""
    if tolerance > MAX_RATIO_TOLERANCE:
        reason = (
            f"the loss changes by {noise:.1%} between two evaluations on the same batch "
            f"(dropout or other randomness), too much to tell a mean from a sum safely"
        )
    else:
        for hypothesis, expected_ratio in (("mean", 1.0), ("sum", 2.0)):
            if abs(ratio / expected_ratio - 1.0) > tolerance:
                continue
            if not half_losses:
                verdict = hypothesis  # type: ignore[assignment]
                break
            # A mean is the size-weighted mean of the halves' means; a sum the sum of theirs.
            weights = [n / batch_size for n in sizes] if hypothesis == "mean" else [1.0, 1.0]
            terms = [w * h for w, h in zip(weights, half_losses, strict=True)]
            halves_loss = sum(terms)
            if abs(loss - halves_loss) <= tolerance * sum(map(abs, terms)):
                verdict = hypothesis  # type: ignore[assignment]
            break
        if verdict is None:
            reason = (
                "the loss is neither a mean nor a sum of per-sample losses: it may mix samples "
                "(BatchNorm in training mode or other batch statistics, contrastive or "
                "pairwise terms), be normalised by something "
                "other than the number of samples, or the batch may hold tensors whose first "
                "dimension is not the sample dimension"
            )
    return ReductionMeasurement(
        batch_size, loss, doubled_loss, halves_loss, noise, tolerance, verdict, reason
    )
