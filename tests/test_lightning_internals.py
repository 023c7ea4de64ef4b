"""Every Lightning internal the package uses (``lightning_gradwatch/_lightning.py``), checked on
the installed Lightning. CI runs the suite on the oldest supported version and the current
one, so a release that moves one of them fails here, by name."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import _lightning as internals
from lightning_gradwatch.loggers import is_logging_step


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self.layer(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)),
        batch_size=4,
    )


class Recorder(Callback):
    """Reads every internal at the end of each training batch."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, bool, bool, str | None]] = []
        self.before_step: list[bool] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        # The logging policy is asked before the optimizer step too (GradientSNR does).
        self.before_step.append(is_logging_step(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.rows.append(
            (
                trainer.global_step,
                internals.batches_that_stepped(trainer),
                self.before_step.pop(),
                internals.logger_connector_logs_this_step(trainer),
                internals.current_hook_name(pl_module),
            )
        )


def _fit(tmp_path: Path, callbacks: list, **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(Tiny(), _loader())
    return trainer


def test_step_counter_and_logging_schedule(tmp_path: Path) -> None:
    recorder = Recorder()
    _fit(tmp_path, [recorder], logger=CSVLogger(tmp_path), log_every_n_steps=2)
    counters = [row[1] for row in recorder.rows]
    # The counter is Lightning's optimizer-step count: one per batch here, never decreasing.
    assert counters == sorted(counters) and len(set(counters)) == len(counters) == 6
    assert all(isinstance(c, int) for c in counters)
    # The answer before the optimizer step equals the one at the batch end.
    assert [row[2] for row in recorder.rows] == [row[3] for row in recorder.rows]
    assert sum(row[3] for row in recorder.rows) == 3  # every second of 6 steps
    assert {row[4] for row in recorder.rows} == {"on_train_batch_end"}


@pytest.mark.parametrize("every", [0, 1, 3])
def test_logging_policy_matches_what_lightning_writes(tmp_path: Path, every: int) -> None:
    """is_logging_step says yes exactly on the steps where a user's on-step value is written
    (including log_every_n_steps=0, where Lightning writes no step values at all)."""

    class Flags(Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            pl_module.log("user_value", float(batch_idx), on_step=True, on_epoch=False)
            if is_logging_step(trainer):
                self.steps.append(internals.batches_that_stepped(trainer))

    flags = Flags()
    logger = CSVLogger(tmp_path)
    _fit(tmp_path, [flags], logger=logger, log_every_n_steps=every)
    logger.save()
    written: list[int] = []
    metrics_file = Path(logger.log_dir) / "metrics.csv"
    if metrics_file.exists():
        with metrics_file.open() as f:
            written = [int(r["step"]) for r in csv.DictReader(f) if r.get("user_value")]
    # The CSV step is Lightning's counter after the optimizer step; the flags read it before.
    assert [s + 1 for s in flags.steps] == written or flags.steps == written
    assert (len(written) == 0) == (every == 0)


def test_update_callback_metrics(tmp_path: Path) -> None:
    class Put(Callback):
        def on_train_batch_end(self, trainer, *args: Any) -> None:  # type: ignore[no-untyped-def]
            internals.update_callback_metrics(trainer, {"probe/x": torch.tensor(2.5)})

    trainer = _fit(tmp_path, [Put()], logger=False)
    assert float(trainer.callback_metrics["probe/x"]) == 2.5


def test_hidden_step_values_are_not_written_again(tmp_path: Path) -> None:
    class LogOnce(Callback):
        def __init__(self, hide: bool) -> None:
            self.hide, self.keys = hide, []

        def on_train_batch_start(self, trainer, *args: Any) -> None:  # type: ignore[no-untyped-def]
            if self.hide:
                internals.hide_step_values(trainer, self.keys)
            self.keys.clear()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            if batch_idx == 0:
                pl_module.log("once", 1.0, on_step=True, on_epoch=False)
                self.keys.append(f"{internals.current_hook_name(pl_module)}.once")

    def rows_with_value(hide: bool) -> int:
        logger = CSVLogger(tmp_path, name=f"hide{hide}")
        _fit(tmp_path, [LogOnce(hide)], logger=logger, log_every_n_steps=1)
        with open(Path(logger.log_dir) / "metrics.csv") as handle:
            return sum(1 for row in csv.DictReader(handle) if row.get("once"))

    assert rows_with_value(hide=True) == 1
    # Without hiding, Lightning re-sends the last value at later logging steps: the reason
    # hide_step_values exists (if this ever reads 1, the workaround can go).
    assert rows_with_value(hide=False) > 1


def test_early_stopping_helpers(tmp_path: Path) -> None:
    stopper = EarlyStopping(monitor="loss", verbose=True)
    seen: list[bool] = []

    class Check(Callback):
        def on_train_batch_end(self, trainer, *args: Any) -> None:  # type: ignore[no-untyped-def]
            seen.append(internals.early_stopping_should_skip(stopper, trainer))
            internals.early_stopping_log_info(stopper, trainer, "checked")

    _fit(tmp_path, [Check()], logger=False, max_steps=2)
    assert seen == [False, False]  # fitting, not sanity checking: EarlyStopping would check


def test_overrides_and_version_gate() -> None:
    class WithValidation(Tiny):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

    assert internals.overrides("validation_step", WithValidation())
    assert not internals.overrides("validation_step", Tiny())
    assert (internals.EarlyStoppingReason is not None) == internals.LIGHTNING_GE_2_6


def test_epoch_end_flag_reads_what_the_user_passed() -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    assert internals.epoch_end_flag(EarlyStopping(monitor="x")) is None
    assert internals.epoch_end_flag(EarlyStopping(monitor="x", check_on_train_epoch_end=True))
    assert (
        internals.epoch_end_flag(ModelCheckpoint(monitor="x", save_on_train_epoch_end=False))
        is False
    )
    with pytest.raises(TypeError, match="EarlyStopping or ModelCheckpoint"):
        internals.epoch_end_flag(object())


def test_reset_metric_in_place_zeroes_the_same_storage() -> None:
    from lightning_gradwatch.metrics import GradientNoiseSums

    sums = GradientNoiseSums({"w": 3})
    g = torch.randn(4, 3)
    sums.update({"w": g.sum(0)}, {"w": g.pow(2).sum(0)}, {"w": g.pow(2).sum(1)}, 4)
    storage = sums.grad_sum.data_ptr()
    internals.reset_metric_in_place(sums)
    assert sums.grad_sum.data_ptr() == storage and not sums.grad_sum.any()
    assert int(sums.count) == 0
    # The metric works as after reset(): a new update is counted from zero.
    sums.update({"w": g.sum(0)}, {"w": g.pow(2).sum(0)}, {"w": g.pow(2).sum(1)}, 4)
    assert int(sums.compute().count) == 4


def test_mark_metric_loaded_lets_compute_run_without_a_warning() -> None:
    import warnings

    from lightning_gradwatch.metrics import AlignmentMoments

    source = AlignmentMoments()
    source.update(torch.tensor([0.1, 0.5, -0.2, 0.9]))
    loaded = AlignmentMoments()
    loaded.count, loaded.power_sums = source.count.clone(), source.power_sums.clone()
    internals.mark_metric_loaded(loaded, updated=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "compute called before update" would raise
        result = loaded.compute()
    assert float(result["mean"]) == pytest.approx(0.325)


def test_apply_to_collection_rebuilds_nested_batches() -> None:
    """The batch traversal the loss-reduction measurement uses: every tensor in tuples, lists,
    dicts and namedtuples transformed, the container types and other leaves kept."""
    from collections import namedtuple

    from lightning_gradwatch._lightning import apply_to_collection

    Pair = namedtuple("Pair", "x y")
    batch = {"a": (torch.ones(2), [torch.zeros(3), "label"]), "b": Pair(torch.ones(1), 5)}
    out = apply_to_collection(batch, torch.Tensor, lambda t: t + 1)
    assert isinstance(out["a"], tuple) and isinstance(out["a"][1], list)
    assert isinstance(out["b"], Pair) and out["b"].y == 5 and out["a"][1][1] == "label"
    assert torch.equal(out["a"][0], torch.full((2,), 2.0))
    assert torch.equal(out["a"][1][0], torch.ones(3))
    assert torch.equal(out["b"].x, torch.full((1,), 2.0))


def test_redirected_call_runs_the_method_as_a_call_of_the_wrapper() -> None:
    """Lightning's forward redirection: the wrapper's forward is what runs, and it returns the
    LightningModule method's output (the loss for ``training_step``)."""

    class Module(pl.LightningModule):
        def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
            return batch.sum() * 2

    calls: list[str] = []

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            calls.append("wrapper")
            redirected.append(internals.runs_redirected_training_step(self.module))
            return self.module(*args, **kwargs)

    redirected: list[bool] = []
    module = Module()
    assert not internals.runs_redirected_training_step(module)
    out = internals.redirected_call(Wrapper(module), module, "training_step", torch.ones(3), 0)
    assert calls == ["wrapper"]
    assert float(out) == 6.0
    # The instance's forward is patched when the wrapper calls the module (and the original,
    # bound, is left there afterwards: the detector asks only at the outermost call of a
    # step it knows to be redirected).
    assert redirected == [True]


def test_training_step_not_redirected_on_one_device(tmp_path: Path) -> None:
    """On a single-device strategy the LightningModule is not wrapped: ``training_step`` runs
    directly (the DDP side is covered by the head-mode DDP tests)."""
    seen: list[bool] = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            seen.append(internals.training_step_redirected(trainer, pl_module))

    _fit(tmp_path, [Record()], max_steps=2, logger=False)
    assert seen == [False, False]


def test_train_step_context_follows_the_precision() -> None:
    """Autocast around ``training_step`` where the precision asks for it (bf16 on the CPU),
    none in full precision."""
    trainer = pl.Trainer(accelerator="cpu", precision="32-true", logger=False)
    with internals.train_step_context(trainer):
        assert not torch.is_autocast_enabled("cpu")
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    with internals.train_step_context(trainer):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_active_grad_scaler_only_under_mixed_precision(tmp_path: Path) -> None:
    """The plugin's ``GradScaler`` where ``precision="16-mixed"`` enables one (the CPU has
    none: bf16 there), ``None`` for full precision."""
    trainer = pl.Trainer(accelerator="cpu", precision="32-true", logger=False)
    assert internals.active_grad_scaler(trainer) is None
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = pl.Trainer(accelerator="cpu", plugins=[plugin], logger=False)
    assert internals.active_grad_scaler(trainer) is scaler
    disabled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", enabled=False))
    trainer = pl.Trainer(accelerator="cpu", plugins=[disabled], logger=False)
    assert internals.active_grad_scaler(trainer) is None
