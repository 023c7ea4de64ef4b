"""GWAEarlyStopping: the paper's selection rules on known curves, and in a real Lightning run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_gwa_callback import Classifier, fit

from lightning_gradwatch import GradientWeightAlignment, GWAEarlyStopping


class FakeStrategy:
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision


def drive(
    stopper: GWAEarlyStopping, curve: list[float], start: int = 0
) -> tuple[int | None, int | None]:
    """Feed one value per epoch; return (epoch at which it stopped, best_epoch)."""
    trainer = SimpleNamespace(
        callbacks=[],
        lightning_module=None,
        fast_dev_run=False,
        strategy=FakeStrategy(),
        should_stop=False,
    )
    for epoch, value in enumerate(curve, start):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"gwa/epoch": torch.tensor(value)}
        stopper._run_early_stopping_check(trainer)  # type: ignore[arg-type]
        if trainer.should_stop:
            return epoch, stopper.best_epoch
    return None, stopper.best_epoch


def offline_rule(curve: list[float], finetune: bool) -> int:
    """The paper's selection on a finished curve: argmax, or argmax after the argmin."""
    start = min(range(len(curve)), key=curve.__getitem__) if finetune else 0
    return max(range(start, len(curve)), key=curve.__getitem__)


def test_from_scratch_is_the_maximum_with_patience() -> None:
    curve = [0.1, 0.3, 0.5, 0.45, 0.4, 0.2, 0.1]
    stopped, best = drive(GWAEarlyStopping(patience=2), curve)
    assert (stopped, best) == (4, offline_rule(curve, False)) == (4, 2)
    # without enough patience to see the whole curve it still tracks the running maximum
    assert drive(GWAEarlyStopping(patience=100), curve) == (None, 2)


def test_finetune_takes_the_maximum_after_the_initial_minimum() -> None:
    curve = [0.9, 0.6, 0.3, 0.2, 0.35, 0.5, 0.45, 0.4, 0.3]
    stopped, best = drive(GWAEarlyStopping(patience=3, finetune=True), curve)
    assert best == offline_rule(curve, True) == 5 and stopped == 8
    # the from-scratch rule would stop during the initial descent, keeping epoch 0
    assert drive(GWAEarlyStopping(patience=3), curve) == (3, 0)


def test_min_delta_smoothing_and_non_finite() -> None:
    assert drive(GWAEarlyStopping(patience=1, min_delta=0.05), [0.1, 0.12, 0.3]) == (1, 0)
    stopper = GWAEarlyStopping(patience=5, smoothing=0.5)
    drive(stopper, [1.0, 0.0, 1.0])
    assert [v[2] for v in stopper.values] == [1.0, 0.5, 0.75]
    with pytest.raises(ValueError, match="smoothing"):
        GWAEarlyStopping(smoothing=1.0)
    stopper = GWAEarlyStopping(patience=1)
    with pytest.warns(UserWarning, match="skipped"):
        assert drive(stopper, [0.2, math.nan, 0.3]) == (None, 2)


def test_state_round_trip() -> None:
    stopper = GWAEarlyStopping(patience=3, finetune=True, smoothing=0.2)
    drive(stopper, [0.5, 0.2, 0.3])
    restored = GWAEarlyStopping(patience=3, finetune=True, smoothing=0.2)
    restored.load_state_dict(stopper.state_dict())
    assert drive(restored, [0.1, 0.4], start=3) == drive(stopper, [0.1, 0.4], start=3)
    assert restored.values == stopper.values and restored.best_epoch == 4


def test_in_lightning_any_callback_order_and_checkpoint_recipe(tmp_path) -> None:
    torch.manual_seed(0)
    stopper = GWAEarlyStopping(patience=2)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, monitor="gwa/epoch", mode="max", save_on_train_epoch_end=True
    )
    gwa = GradientWeightAlignment(indices=None)
    # the stopper before the GWA callback: it finalises the epoch itself
    trainer = fit(
        Classifier(lr=2.0).double(),
        [stopper, gwa, checkpoint],
        epochs=30,
        enable_checkpointing=True,
    )
    curve = [h["gwa"] for h in gwa.history]
    assert [v[1] for v in stopper.values] == pytest.approx(curve)
    assert stopper.best_epoch == offline_rule(curve, False)
    if trainer.should_stop:
        assert stopper.stopped_epoch == len(curve) - 1 < 29
    assert float(checkpoint.best_model_score) == pytest.approx(max(curve), rel=1e-6)
    assert f"epoch={stopper.best_epoch}-" in checkpoint.best_model_path
    assert isinstance(trainer, pl.Trainer)
