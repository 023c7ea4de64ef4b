"""No host-device synchronisation per step: the probe, and the callback base class with
``handles_nonfinite``, make no call that reads a tensor to the host on steps after the first
(the first runs the one-time checks). Counted on the CPU with a ``TorchFunctionMode``, which
sees every such call (``.item()``, ``bool()``, ``float()``, ``int()``, ``.tolist()``,
``.cpu()``, indexing with a tensor)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientProbe
from lightning_gradwatch.callbacks._probe_callback import ProbeCallback
from lightning_gradwatch.probe import ProbeStats

_SYNCS = {
    Tensor.item,
    Tensor.__bool__,
    Tensor.__float__,
    Tensor.__int__,
    Tensor.__index__,
    Tensor.tolist,
    Tensor.cpu,
}


class SyncCounter(TorchFunctionMode):
    """Counts calls that would make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func in _SYNCS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    )


@pytest.mark.parametrize("sum_grad_squared", [False, True])
@pytest.mark.parametrize("loss_scale", [1.0, "tensor", "callable tensor"])
def test_probe_steps_make_no_synchronising_call(sum_grad_squared: bool, loss_scale: Any) -> None:
    model = _model()
    scale = torch.tensor(8.0)
    if loss_scale == "tensor":
        loss_scale = scale
    elif loss_scale == "callable tensor":
        loss_scale = lambda: scale  # noqa: E731
    probe = GradientProbe(model, sum_grad_squared=sum_grad_squared, loss_scale=loss_scale)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))

    def step() -> ProbeStats:
        opt.zero_grad(set_to_none=True)
        with probe:
            (F.cross_entropy(model(x), y) * scale).backward()
        opt.step()
        stats = probe.stats
        stats.alignment()
        stats.finite  # noqa: B018  (computed, kept on the device)
        return stats

    step()  # the first step runs the one-time checks (parameter uses, sample dims)
    with SyncCounter() as counter:
        for _ in range(4):
            stats = step()
    assert counter.calls == []
    assert stats.is_finite() and probe.skipped_backwards == 0
    # The counters read on demand still count: a NaN step is counted once.
    x[0, 0] = float("nan")
    with SyncCounter() as counter:
        step()
    assert counter.calls == []
    assert probe.skipped_backwards == 1 and not probe.stats.is_finite()


def test_use_checker_leaves_after_the_first_backward() -> None:
    model = _model()
    probe = GradientProbe(model)
    x = torch.randn(5, 6)
    with probe:
        model(x).sum().backward()
        assert probe._checker is not None  # still entered: retired at the next forward
        model(x).sum().backward()
        assert probe._checker is None and probe._dims_hook is None
    with probe:  # verify="first": not entered again
        assert probe._checker is None


class _DeviceSums(ProbeCallback):
    """Accumulates a statistic on the device, leaving non-finite backwards out with the flag."""

    handles_nonfinite = True

    def __init__(self) -> None:
        super().__init__()
        self.total: Tensor | None = None

    def on_probe_stats(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stats: ProbeStats,
        batch: Any,
        batch_idx: int,
    ) -> None:
        value = torch.where(stats.finite, stats.grad_sq_norm().sum(), 0.0)
        self.total = value if self.total is None else self.total + value


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _model()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _count_fit(callbacks: list[pl.Callback], steps: int, tmp_path: Path) -> int:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer = pl.Trainer(
        callbacks=callbacks,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
    with warnings.catch_warnings(), SyncCounter() as counter:
        warnings.simplefilter("ignore")
        trainer.fit(_Classifier(), DataLoader(data, batch_size=4))
    return len(counter.calls)


def test_callback_adds_no_synchronising_call_per_step(tmp_path: Path) -> None:
    # Lightning and the GradScaler make their own reads; the callback must add none per step,
    # so the per-step count of a run with it equals that of a plain run.
    plain = _count_fit([], 6, tmp_path) - _count_fit([], 3, tmp_path)
    callback = _DeviceSums()
    probed = _count_fit([callback], 6, tmp_path) - _count_fit([_DeviceSums()], 3, tmp_path)
    assert probed == plain
    assert callback.skipped_steps == 0 and callback.total is not None
    assert bool(callback.total.isfinite()) and float(callback.total) > 0


class _PoisonedClassifier(_Classifier):
    """The third batch's loss is NaN."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == 2 else loss


def test_nonfinite_backward_is_counted_on_the_device_and_masked(tmp_path: Path) -> None:
    callback = _DeviceSums()
    trainer = pl.Trainer(
        callbacks=[callback],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        max_steps=3,  # the NaN batch is the last, so NaN weights poison no later step
    )
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_PoisonedClassifier(), DataLoader(data, batch_size=4))
    assert callback._finite_pending  # counted on the device, not yet read
    assert callback.skipped_steps == 1
    assert callback.total is not None and bool(callback.total.isfinite())
    assert callback.state_dict() == {"skipped_steps": 1}


def test_public_probe_api() -> None:
    model = _model()
    probe = GradientProbe(model, params=["0.weight", "5.bias"])
    assert not probe.active
    with probe:
        assert probe.active
    assert not probe.active
    owners = probe.owners()
    assert [(type(m), names) for m, names in owners] == [
        (nn.Linear, {"weight": "0.weight"}),
        (nn.Linear, {"bias": "5.bias"}),
    ]
    assert owners[0][0] is model[0] and probe.param_names == ["0.weight", "5.bias"]


def test_empty_statistics_are_finite() -> None:
    stats = ProbeStats(batch_size=0)
    assert stats.is_finite() and bool(stats.finite) and stats.finite.dtype == torch.bool


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_steps_make_no_synchronising_call(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(10, 4, mode=mode), nn.Linear(4, 3))
    probe = GradientProbe(model, sum_grad_squared=True)
    idx = torch.tensor([[1, 1, 2], [0, 3, 3], [5, 4, 1], [9, 9, 9]])
    y = torch.randint(0, 3, (4,))

    def step() -> None:
        with probe:
            F.cross_entropy(model(idx), y).backward()
        model.zero_grad(set_to_none=True)

    step()
    with SyncCounter() as counter:
        step()
        step()
    assert counter.calls == []
    assert sorted(probe.stats.names) == ["0.weight", "1.bias", "1.weight"]
