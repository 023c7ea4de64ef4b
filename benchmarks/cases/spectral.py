"""SpectralNorms overhead cases.

- weights every step (power iteration, warm-started): the default use, target <= 1.05x;
- gradient spectra every 50 steps (full SVD of each layer's batch gradient), and every step to
  show the cost of one such read;
- the same weight norms from a full ``torch.linalg.svdvals`` of every layer at every step: what
  power iteration saves.
"""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import override

from benchmarks.harness import CallbackCase
from lightning_gradwatch import SpectralNorms
from lightning_gradwatch.callbacks.spectral_norms import _Tracked


class SvdvalsEverySpectralNorms(SpectralNorms):
    """``SpectralNorms`` with the power iteration replaced by a full ``svdvals`` per layer:
    everything else (selection, logging, summaries) is the same, so the difference is the
    cost of the exact spectrum."""

    @override
    def _iterate(self, t: _Tracked, matrix: Tensor, n: int) -> Tensor:
        return torch.linalg.svdvals(matrix)[0]


ALL = ("mlp", "cnn", "transformer")

CASES = [
    CallbackCase(
        label="spectral weights every step",
        make_callbacks=lambda: [SpectralNorms(grad_every_n_steps=None)],
        trainer_kwargs={"log_every_n_steps": 1},
        target=dict.fromkeys(ALL, 1.05),
    ),
    # The harness reports per-step medians, so a read every 50 steps shows as the weights-only
    # cost; the next case shows what one gradient read costs (amortised: 1/50 of its excess).
    CallbackCase(
        label="spectral weights every step + gradient SVD every 50 steps",
        make_callbacks=lambda: [SpectralNorms(grad_every_n_steps=50)],
        trainer_kwargs={"log_every_n_steps": 1},
    ),
    CallbackCase(
        label="spectral gradient SVD every step (cost of one read)",
        make_callbacks=lambda: [SpectralNorms(grad_every_n_steps=1)],
        trainer_kwargs={"log_every_n_steps": 1},
    ),
    CallbackCase(
        label="spectral full svdvals every step (not the default)",
        make_callbacks=lambda: [SvdvalsEverySpectralNorms(grad_every_n_steps=None)],
        trainer_kwargs={"log_every_n_steps": 1},
    ),
]
