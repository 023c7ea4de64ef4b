"""Misconfiguration gets a message that names the cause and the fix, raised at ``setup`` or at
the first training batch (never later): one case per misconfiguration handled here."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_gradwatch import (
    GradientProbe,
    GradientSNR,
    GradientWeightAlignment,
    IndexedDataset,
    SpectralNorms,
)
from lightning_gradwatch.callbacks.spectral import history as spectral_history

N, D, H, K = 48, 6, 8, 4


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(D, H), nn.Tanh())
        self.head = nn.Linear(H, K)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BatchCounter(Callback):
    """How many training batches started before the error."""

    def __init__(self) -> None:
        self.started = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.started += 1


def _data(n: int = N) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, D, generator=g), torch.randint(0, K, (n,), generator=g)


def _fit(tmp_path: Path, callbacks: list, data: Any, **kwargs: object) -> BatchCounter:
    counter = BatchCounter()
    kwargs.setdefault("batch_size", 16)
    loader = DataLoader(data, batch_size=kwargs.pop("batch_size"))  # type: ignore[arg-type]
    trainer = pl.Trainer(
        max_epochs=kwargs.pop("max_epochs", 1),
        accelerator="cpu",
        devices=1,
        logger=kwargs.pop("logger", False),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[*callbacks, counter],
        **kwargs,  # type: ignore[arg-type]
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no logger.*")
        trainer.fit(Classifier(), loader)
    return counter


def _fails_at_first_batch(
    tmp_path: Path, callbacks: list, data: Any, match: str, error: type = ValueError
) -> str:
    counter = BatchCounter()
    with pytest.raises(error, match=match) as caught:
        loader = DataLoader(data, batch_size=16)
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[*callbacks, counter],
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*has no logger.*")
            trainer.fit(Classifier(), loader)
    assert counter.started <= 1, "raised after the first batch"
    return str(caught.value)


# ----------------------------------------------------------------------------- indices
def test_labels_taken_as_indices_on_a_tuple_batch(tmp_path: Path) -> None:
    """``indices=1`` on ``(x, y)`` batches points at the labels, which repeat in a batch."""
    message = _fails_at_first_batch(
        tmp_path,
        [GradientWeightAlignment(indices=1)],
        TensorDataset(*_data()),
        match="repeat within one training batch",
    )
    assert "indices=1" in message and "IndexedDataset" in message and "indices=-1" in message


class Stream(IterableDataset):
    """An iterable dataset of ``(x, y)`` without indices, as users stream data."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = _data()
        yield from zip(x, y, strict=True)


def test_labels_taken_as_indices_on_an_iterable_dataset(tmp_path: Path) -> None:
    message = _fails_at_first_batch(
        tmp_path,
        [GradientWeightAlignment(indices=-1)],
        Stream(),
        match="repeat within one training batch",
    )
    assert "indices=-1" in message and "indices=None" in message


def test_label_like_indices_without_repeats_in_a_batch_warn_once(tmp_path: Path) -> None:
    """Labels that are a permutation of the classes in every batch pass the per-batch checks;
    the epoch's few distinct values give them away."""
    x, _ = _data()
    labels = torch.arange(N) % K  # each batch of K holds every class once
    gwa = GradientWeightAlignment(indices=1)
    with pytest.warns(UserWarning, match="look like labels") as record:
        _fit(tmp_path, [gwa], TensorDataset(x, labels), batch_size=K, max_epochs=2)
    assert sum("look like labels" in str(w.message) for w in record) == 1
    assert "IndexedDataset" in str(next(w for w in record if "labels" in str(w.message)).message)


@pytest.mark.parametrize(
    ("indices", "match", "fix"),
    [
        (lambda batch: batch[-1] - 1, "dataset index -1 < 0", "non-negative"),
        (lambda batch: batch[-1] + N, f"has {N} samples", "IndexedDataset"),
        (lambda batch: batch[-1].double(), "must be 16 integers", "indices=None"),
    ],
    ids=["negative", "beyond-dataset", "float"],
)
def test_invalid_indices_fail_at_the_first_batch(
    tmp_path: Path, indices: Any, match: str, fix: str
) -> None:
    message = _fails_at_first_batch(
        tmp_path,
        [GradientWeightAlignment(indices=indices)],
        IndexedDataset(TensorDataset(*_data())),
        match=match,
    )
    assert fix in message


# ----------------------------------------------------------------------------- params
def test_a_single_name_is_accepted_everywhere(tmp_path: Path) -> None:
    gsnr = GradientSNR(params="head.weight", every_n_steps=1)
    spectral = SpectralNorms(params="head.weight")
    gwa = GradientWeightAlignment(params="head.weight", indices=-1)
    _fit(tmp_path, [gwa, gsnr, spectral], IndexedDataset(TensorDataset(*_data())))
    assert gsnr.probe is not None and gsnr.probe.param_names == ["head.weight"]
    assert spectral.tracked_names == ["head.weight"]
    assert gwa.score_names == ["head.weight"] and gwa.history[-1]["count"] == N
    probe = GradientProbe(Classifier(), params="head.weight")
    assert probe.param_names == ["head.weight"]


def test_a_misspelt_single_name_is_reported_whole(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown parameter names \['head\.wieght'\]"):
        GradientProbe(Classifier(), params="head.wieght")
    with pytest.raises(ValueError, match=r"\['head\.wieght'\]") as caught:
        _fit(tmp_path, [GradientSNR(params="head.wieght")], TensorDataset(*_data()))
    assert "named_parameters" in str(caught.value)


def test_a_bias_in_gwa_params_is_refused_at_setup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="defined on weights only") as caught:
        _fit(tmp_path, [GradientWeightAlignment(params="head.bias")], TensorDataset(*_data()))
    assert "head.bias" in str(caught.value) and "params=['head.weight']" in str(caught.value)
    with pytest.raises(ValueError, match="defined on weights only") as caught:
        _fit(
            tmp_path,
            [GradientWeightAlignment(params=["features.0.weight", "features.0.bias"])],
            TensorDataset(*_data()),
        )
    assert "params=['features.0.weight']" in str(caught.value)


# ----------------------------------------------------------------------------- heatmap
@pytest.mark.parametrize("logger", ["none", "csv"])
def test_heatmap_is_not_rendered_without_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logger: str
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Tensor:
        raise AssertionError("heatmap rendered although no TensorBoard logger writes it")

    monkeypatch.setattr(spectral_history, "render_heatmap", refuse)
    spectral = SpectralNorms(heatmap=True)
    _fit(
        tmp_path,
        [spectral],
        TensorDataset(*_data()),
        max_epochs=2,
        logger=False if logger == "none" else CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    assert len(spectral.history.columns) == 6  # the history a heatmap would show was recorded


# ----------------------------------------------------------------------------- head under DDP
def test_head_is_found_through_lightnings_forward_redirection() -> None:
    """Under DDP Lightning runs ``training_step`` as a call of the wrapped LightningModule
    (its forward redirection, reproduced by ``_lightning.redirected_call``), so its outermost
    output is the loss. The detector looks through that call. In-process here;
    tests/test_hostile_config.py runs both DDP launchers."""
    from lightning_gradwatch._lightning import redirected_call
    from lightning_gradwatch.callbacks.gradient_weight_alignment import _HeadDetector

    class Wrapper(nn.Module):  # stands for DistributedDataParallel
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.module(*args, **kwargs)

    module = Classifier()
    batch = _data(8)
    candidates = {"features.0.weight", "head.weight"}
    for redirected, expected in ((True, "head.weight"), (False, None)):
        detector = _HeadDetector(module, candidates, redirected=redirected)
        redirected_call(Wrapper(module), module, "training_step", batch, 0)
        # without looking through the redirected call, the loss hides the head
        assert detector.finish() == expected


# ---------------------------------------------------------------------------------------------
# The remaining items of the list, through the callbacks a user configures.


class FrozenHead(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.head.weight.requires_grad_(False)


def test_a_frozen_weight_named_in_params_says_it_is_frozen(tmp_path: Path) -> None:
    counter = BatchCounter()
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[GradientWeightAlignment(params="head.weight", indices=None), counter],
    )
    with pytest.raises(ValueError, match=r"frozen \(requires_grad=False\)") as caught:
        trainer.fit(FrozenHead(), DataLoader(TensorDataset(*_data()), batch_size=16))
    assert "requires_grad_(True)" in str(caught.value)  # what to do
    assert "does not own" not in str(caught.value)
    assert counter.started == 0  # at setup


def test_gwa_early_stopping_without_gwa_or_with_a_typo_fails_at_setup(tmp_path: Path) -> None:
    from lightning_gradwatch import GWAEarlyStopping

    counter = BatchCounter()
    with pytest.raises(ValueError, match="needs a GradientWeightAlignment"):
        _fit(tmp_path, [GWAEarlyStopping(), counter], TensorDataset(*_data()))
    assert counter.started == 0
    # A misspelt key fails when the callback is built, naming the valid forms...
    with pytest.raises(
        ValueError, match="monitor must be 'gwa/aggregate' or 'gwa_layers/aggregate/"
    ):
        GWAEarlyStopping(monitor="gwa/epoc")
    # ... and a misspelt layer before the first batch, listing the keys the GWA callback logs.
    counter = BatchCounter()
    with pytest.raises(ValueError, match=r"Valid keys: \['gwa/aggregate'\]"):
        _fit(
            tmp_path,
            [
                GradientWeightAlignment(indices=None),
                GWAEarlyStopping(monitor="gwa_layers/aggregate/head.wieght"),
                counter,
            ],
            TensorDataset(*_data()),
        )
    assert counter.started == 0


class SpectralHead(Classifier):
    def __init__(self) -> None:
        super().__init__()
        torch.nn.utils.parametrizations.spectral_norm(self.head)


def test_a_parametrized_head_is_scored_not_reported_as_unknown(tmp_path: Path) -> None:
    # The head's weight is computed by a parametrization: head mode scores the effective
    # weight (documented in docs/gwa.md) instead of failing with "unknown parameter names".
    gwa = GradientWeightAlignment(indices=None)
    _fit(tmp_path, [gwa], TensorDataset(*_data()))
    assert gwa.head_name == "head.weight"
    assert len(gwa.history) == 1 and gwa.history[0]["count"] == N


class BatchNormHead(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(D, H), nn.BatchNorm1d(H), nn.Tanh())


def test_a_gwa_weight_with_no_scores_is_named_at_the_first_batch(tmp_path: Path) -> None:
    gwa = GradientWeightAlignment(params="features.1.weight", indices=None)
    counter = BatchCounter()
    with pytest.warns(UserWarning, match=r"excluded \['features.1.weight'\]") as record:
        trainer = pl.Trainer(
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            default_root_dir=tmp_path,
            callbacks=[gwa, counter],
        )
        trainer.fit(BatchNormHead(), DataLoader(TensorDataset(*_data()), batch_size=16))
    first = next(str(r.message) for r in record if "excluded ['features.1.weight']" in str(r))
    assert "BatchNorm" in first  # the reason


def test_early_stopping_beside_reweighting_warns_at_setup(tmp_path: Path) -> None:
    # Measured to stop early and lose accuracy (benchmarks/README.md): say so before training.
    from lightning_gradwatch import GWAEarlyStopping, GWAReweighting

    gwa = GradientWeightAlignment(indices=-1)
    callbacks = [gwa, GWAReweighting(), GWAEarlyStopping(patience=None)]
    with pytest.warns(UserWarning, match="GWAEarlyStopping beside GWAReweighting"):
        _fit(tmp_path, callbacks, IndexedDataset(TensorDataset(*_data())))
