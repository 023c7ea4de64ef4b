"""Benchmark models: a fixed synthetic batch and a model for each key in ``MODEL_KEYS``.

Every model is deterministic (no dropout), so the probe's rules, ``torch.func`` and BackPACK all
see the same computation. ``make_model`` returns the model with its batch; ``BenchModule`` wraps
one for the Lightning callback benchmarks and ``fixed_batch_loader`` feeds it the same batch
every step (no collation cost inside the timed step).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

#: Every model key ``make_model`` accepts (the harness's ``MODEL_KEYS`` plus ``cnn2d``).
ALL_MODEL_KEYS = ("mlp", "cnn", "cnn2d", "transformer")

#: Batch size per model key, chosen so one CPU training step takes roughly 20-200 ms.
BATCH_SIZES = {"mlp": 256, "cnn": 256, "cnn2d": 64, "transformer": 32}

NUM_CLASSES = 10


class TransformerClassifier(nn.Module):
    """Token embedding + 2-layer ``nn.TransformerEncoder`` (d=128, batch first) + mean-pooled
    linear head. Input ``(B, T)`` token ids, output ``(B, classes)`` logits."""

    def __init__(
        self,
        vocab: int = 256,
        d_model: int = 128,
        heads: int = 4,
        layers: int = 2,
        feedforward: int = 512,
        classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, feedforward, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def _mlp(width: int = 512) -> nn.Module:
    return nn.Sequential(
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, NUM_CLASSES),
    )


def _cnn1d(channels: int = 32) -> nn.Module:
    # MNIST-1D-like: (B, 1, 40) -> 3 conv layers -> linear head.
    return nn.Sequential(
        nn.Conv1d(1, channels, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 10, NUM_CLASSES),
    )


def _cnn2d(channels: int = 32) -> nn.Module:
    # CIFAR-like: (B, 3, 32, 32) -> 3 conv layers -> linear head.
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * channels, 2 * channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * channels * 8 * 8, NUM_CLASSES),
    )


def make_model(
    key: str,
    seed: int = 0,
    batch_size: int | None = None,
    width: int | None = None,
    seq_len: int | None = None,
) -> tuple[nn.Module, Tensor, Tensor]:
    """A benchmark model and one synthetic batch for it.

    Args:
        key: one of ``ALL_MODEL_KEYS``: ``"mlp"`` (3 Linear layers, 512 wide, input 512),
            ``"cnn"`` (3 Conv1d layers + linear head on ``(B, 1, 40)``), ``"cnn2d"`` (3 Conv2d
            layers + linear head on ``(B, 3, 32, 32)``), ``"transformer"`` (embedding, 2-layer
            encoder with d=128 on ``T=64`` tokens, linear head).
        seed: seeds both the parameters and the batch.
        batch_size: overrides ``BATCH_SIZES[key]`` (e.g. a tiny batch for smoke tests).
        width: overrides the MLP's width (and input size, 512), the CNNs' channels (32) or the
            transformer's model dimension (128, feed-forward 4x), for the scaling table.
        seq_len: overrides the transformer's number of tokens (64); other models ignore it.

    Returns:
        ``(model, inputs, targets)`` with ``targets`` ``(B,)`` class indices in ``[0, 10)``.
    """
    if key not in ALL_MODEL_KEYS:
        raise ValueError(f"unknown model key {key!r}; choose one of {ALL_MODEL_KEYS}")
    batch = batch_size if batch_size is not None else BATCH_SIZES[key]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model: nn.Module
    if key == "mlp":
        model = _mlp(width or 512)
        inputs = torch.randn(batch, width or 512, generator=generator)
    elif key == "cnn":
        model = _cnn1d(width or 32)
        inputs = torch.randn(batch, 1, 40, generator=generator)
    elif key == "cnn2d":
        model = _cnn2d(width or 32)
        inputs = torch.randn(batch, 3, 32, 32, generator=generator)
    else:
        d_model = width or 128
        model = TransformerClassifier(d_model=d_model, feedforward=4 * d_model)
        inputs = torch.randint(0, 256, (batch, seq_len or 64), generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return model, inputs, targets


class BenchModule(pl.LightningModule):
    """Plain Lightning wrapper: mean cross-entropy, SGD (lr 0.01, momentum 0.9)."""

    def __init__(self, model: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class _FixedBatches(IterableDataset):
    def __init__(self, inputs: Tensor, targets: Tensor, steps: int) -> None:
        self.inputs, self.targets, self.steps = inputs, targets, steps

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.steps):
            yield self.inputs, self.targets

    def __len__(self) -> int:
        return self.steps


def fixed_batch_loader(inputs: Tensor, targets: Tensor, steps: int) -> DataLoader:
    """A loader yielding the same ``(inputs, targets)`` batch ``steps`` times, uncollated."""
    return DataLoader(_FixedBatches(inputs, targets, steps), batch_size=None)
