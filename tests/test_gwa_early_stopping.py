"""GWAEarlyStopping: the online application of the stopping rules, restoring the selected
epoch's weights, resumption, non-finite epochs, setup errors, and Lightning's own callbacks
monitoring ``gwa/aggregate`` beside a validation loop."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from ddp_scripts import DDP_TEARDOWN
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from test_gwa_callback import Classifier, fit
from torch import Tensor, nn

from lightning_gradwatch import GradientWeightAlignment, GWAEarlyStopping
from lightning_gradwatch.callbacks.gwa_early_stopping import StopReason
from lightning_gradwatch.functional.stopping import select_epoch, should_stop


class FakeStrategy:
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision

    def broadcast(self, obj: object, src: int = 0) -> object:
        return obj


class StandIn(nn.Linear):
    """Stands in for the LightningModule: its weights, and what the stopper logs."""

    def __init__(self) -> None:
        super().__init__(1, 1, bias=False)
        self.logged: list[tuple[str, float]] = []

    def log(self, name: str, value: float, **kwargs: object) -> None:
        self.logged.append((name, value))


def drive(stopper: GWAEarlyStopping, curve: list[float]) -> tuple[int | None, StandIn]:
    """Feed one GWA value per epoch through a stand-in GWA callback; the model's weight is set
    to the epoch number at each epoch end. Returns (epoch at which it stopped, the model after
    ``on_fit_end``)."""
    model = StandIn()
    gwa = SimpleNamespace(
        history=[], layer_history={}, skipped_steps=0, finalize_epoch=lambda *a: None
    )
    stopper._gwa = gwa  # type: ignore[assignment]
    trainer = SimpleNamespace(fast_dev_run=False, strategy=FakeStrategy(), should_stop=False)
    stopped = None
    for epoch, value in enumerate(curve):
        trainer.current_epoch = epoch
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        gwa.history.append(
            {"epoch": float(epoch), "gwa": value, "mean": value, "kurtosis": 0.0, "count": 8.0}
        )
        stopper.on_train_epoch_start(trainer, model)  # type: ignore[arg-type]
        stopper.on_train_epoch_end(trainer, model)  # type: ignore[arg-type]
        if trainer.should_stop:
            stopped = epoch
            break
    stopper.on_fit_end(trainer, model)  # type: ignore[arg-type]
    return stopped, model


CASES = [
    ("argmax", {}, [0.1, 0.3, 0.5, 0.45, 0.4, 0.2, 0.1]),
    ("max_after_first_min", {}, [0.9, 0.6, 0.3, 0.2, 0.35, 0.5, 0.45, 0.4, 0.3]),
    ("max_after_first_min", {"min_rel_delta": 0.5}, [0.9, 0.2, 0.21, 0.2, 0.19, 0.18]),
    ("argmax", {"smoothing": 0.5, "warmup": 1}, [2.0, 0.1, 0.4, 0.3, 0.6, 0.2, 0.1, 0.0]),
]


@pytest.mark.parametrize(("rule", "options", "curve"), CASES)
def test_online_decisions_are_the_rule_functions_and_the_weights_follow(
    rule: str, options: dict, curve: list[float]
) -> None:
    stopper = GWAEarlyStopping(rule=rule, patience=2, **options)
    stopped, model = drive(stopper, curve)
    history = [{"gwa": v, "mean": v, "kurtosis": 0.0} for v in curve]
    expected_stop = next(
        (t for t in range(len(curve)) if should_stop(history[: t + 1], rule, 2, **options)), None
    )
    assert stopped == expected_stop
    last = len(curve) - 1 if stopped is None else stopped
    assert stopper.best_epoch == select_epoch(history[: last + 1], rule, **options)
    assert stopper.stop_reason is (
        StopReason.PATIENCE if stopped is not None else StopReason.NOT_STOPPED
    )
    # the model ends with the weights it had at the end of the selected epoch
    assert stopper.restored_epoch == stopper.best_epoch
    assert float(model.weight) == float(stopper.best_epoch)
    # once selected, the selection is logged at every epoch end, the last one the final choice
    selections = [value for name, value in model.logged if name == "gwa/selected_epoch"]
    assert selections and selections[-1] == float(stopper.best_epoch)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1, 1) | st.just(math.nan), min_size=1, max_size=12),
    st.sampled_from(["argmax", "max_after_first_min"]),
    st.integers(1, 4),
)
def test_any_curve_online_matches_the_functions(
    curve: list[float], rule: str, patience: int
) -> None:
    stopper = GWAEarlyStopping(rule=rule, patience=patience, min_rel_delta=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stopped, model = drive(stopper, curve)
    history = [{"gwa": v, "mean": v, "kurtosis": 0.0} for v in curve]
    last = len(curve) - 1 if stopped is None else stopped
    expected = select_epoch(history[: last + 1], rule, min_rel_delta=0.1)
    assert stopper.best_epoch == expected
    if expected is not None and stopper.restored_epoch is not None:
        assert float(model.weight) == float(expected)


def test_patience_none_runs_to_the_end_and_selects() -> None:
    stopper = GWAEarlyStopping(rule="argmax", patience=None)
    stopped, model = drive(stopper, [0.1, 0.5, 0.2, 0.1, 0.0, -0.1])
    assert stopped is None and stopper.best_epoch == 1 and float(model.weight) == 1.0
    assert stopper.stop_reason is StopReason.NOT_STOPPED and stopper.stopped_epoch is None


def test_restore_best_weights_false_leaves_the_last_weights() -> None:
    stopper = GWAEarlyStopping(rule="argmax", patience=2, restore_best_weights=False)
    stopped, model = drive(stopper, [0.1, 0.5, 0.2, 0.1])
    assert stopped == 3 and stopper.best_epoch == 1 and float(model.weight) == 3.0
    assert stopper.restored_epoch is None and stopper.state_dict()["best_state"] is None


def test_never_decides_on_a_stale_value_and_stops_on_request() -> None:
    """An epoch the GWA callback recorded nothing for is NaN, never the previous value."""
    stopper = GWAEarlyStopping(rule="argmax", patience=5, stop_on_nonfinite=True)
    model = StandIn()
    gwa = SimpleNamespace(
        history=[], layer_history={}, skipped_steps=0, finalize_epoch=lambda *a: None
    )
    stopper._gwa = gwa  # type: ignore[assignment]
    trainer = SimpleNamespace(fast_dev_run=False, strategy=FakeStrategy(), should_stop=False)
    trainer.current_epoch = 0
    stopper.on_train_epoch_start(trainer, model)  # type: ignore[arg-type]
    gwa.history.append({"epoch": 0.0, "gwa": 0.3, "mean": 0.1, "kurtosis": -0.9, "count": 8.0})
    stopper.on_train_epoch_end(trainer, model)  # type: ignore[arg-type]
    trainer.current_epoch = 1
    stopper.on_train_epoch_start(trainer, model)  # type: ignore[arg-type]
    gwa.skipped_steps = 3  # every step of epoch 1 had non-finite statistics: no entry
    with pytest.warns(UserWarning, match=r"epoch 1: the per-sample gradients were not finite"):
        stopper.on_train_epoch_end(trainer, model)  # type: ignore[arg-type]
    assert math.isnan(stopper.history[1]["gwa"]) and stopper.history[1]["epoch"] == 1
    assert trainer.should_stop and stopper.stop_reason is StopReason.NONFINITE
    assert stopper.stopped_epoch == 1 and stopper.best_epoch == 0


def test_degenerate_curves_warn_once() -> None:
    with pytest.warns(UserWarning, match="flat"):
        drive(GWAEarlyStopping(patience=None), [0.2, 0.2, 0.2, 0.2])
    with pytest.warns(UserWarning, match="first one"):
        drive(GWAEarlyStopping(rule="argmax", patience=3), [0.9, 0.1, 0.2, 0.3, 0.1])
    with pytest.warns(UserWarning, match="non-finite in all 2 epochs"):
        drive(GWAEarlyStopping(patience=None), [math.nan, math.nan])


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="Unknown stopping rule"):
        GWAEarlyStopping(rule="best")
    with pytest.raises(ValueError, match="smoothing"):
        GWAEarlyStopping(rule="argmax", smoothing=1.0)
    with pytest.raises(ValueError, match="patience"):
        GWAEarlyStopping(patience=0)
    with pytest.raises(ValueError, match="monitor"):
        GWAEarlyStopping(monitor="gwa_epoch")


# ---------------------------------------------------------------------- Lightning runs
def every_epoch_checkpoint(dirpath: Path) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=dirpath,
        filename="{epoch}",
        save_top_k=-1,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
    )


def weights_of(path: Path) -> dict[str, Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


def test_restores_the_selected_epoch_bitwise(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Classifier(lr=2.0).double()
    gwa = GradientWeightAlignment(indices=-1)
    stopper = GWAEarlyStopping(rule="argmax", patience=2)
    # the stopper before the GWA callback: it finishes the GWA epoch itself
    trainer = fit(
        model,
        [stopper, gwa, every_epoch_checkpoint(tmp_path)],
        epochs=12,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
    )
    curve = [h["gwa"] for h in gwa.history]
    assert [h["gwa"] for h in stopper.history] == curve
    assert (
        stopper.best_epoch
        == gwa.best_epoch("argmax")
        == max(range(len(curve)), key=curve.__getitem__)
    )
    assert stopper.best_epoch != trainer.current_epoch - 1  # the restore is not a no-op
    assert stopper.restored_epoch == stopper.best_epoch
    saved = weights_of(tmp_path / f"epoch={stopper.best_epoch}.ckpt")
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    # per-sample scores of the selected epoch by default
    row = gwa.score_history()[stopper.best_epoch]
    worst = gwa.most_misaligned(5)
    assert torch.equal(worst, torch.argsort(row, stable=True)[:5])
    assert torch.equal(gwa.most_misaligned(5, epoch=0), torch.argsort(gwa.score_history()[0])[:5])
    last = gwa.score_history()[-1]
    assert torch.equal(gwa.most_misaligned(5, epoch="last"), torch.argsort(last)[:5])


def test_most_misaligned_says_what_is_missing(tmp_path: Path) -> None:
    gwa = GradientWeightAlignment(indices=-1, keep_history=False)
    fit(Classifier().double(), [gwa], epochs=2, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="keep_history=True"):
        gwa.most_misaligned(3)
    assert gwa.most_misaligned(3, epoch="last").shape == (3,)
    gwa = GradientWeightAlignment(indices=-1)
    fit(Classifier().double(), [gwa], epochs=1, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="epochs with scores: \\[0\\]"):
        gwa.most_misaligned(3, epoch=4)


def test_resume_keeps_history_and_best_copy(tmp_path: Path) -> None:
    def run(epochs: int, ckpt_path: str | None = None) -> tuple[GWAEarlyStopping, Classifier]:
        torch.manual_seed(0)
        model = Classifier(lr=2.0).double()
        stopper = GWAEarlyStopping(rule="argmax", patience=None)
        callbacks = [GradientWeightAlignment(indices=-1), stopper]
        callbacks.append(every_epoch_checkpoint(tmp_path / "ckpt"))
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            precision="64-true",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            default_root_dir=tmp_path,
        )
        from test_gwa_callback import make_data
        from torch.utils.data import DataLoader, TensorDataset

        from lightning_gradwatch import IndexedDataset

        data = IndexedDataset(TensorDataset(*make_data()))
        trainer.fit(model, DataLoader(data, batch_size=16), ckpt_path=ckpt_path)
        return stopper, model

    full, full_model = run(6)
    (tmp_path / "ckpt").rename(tmp_path / "full")
    run(3)
    resumed, resumed_model = run(6, ckpt_path=str(tmp_path / "ckpt" / "epoch=2.ckpt"))
    assert resumed.history == full.history
    assert resumed.best_epoch == full.best_epoch
    for name, value in full_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name


class Diverging(Classifier):
    """The loss turns NaN from epoch 1 on: the optimizer step then poisons the weights."""

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.current_epoch >= 1 else loss


def test_nan_loss_is_reported_and_stops_on_request(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Diverging().double()
    gwa = GradientWeightAlignment(indices=-1)
    stopper = GWAEarlyStopping(rule="argmax", patience=5, stop_on_nonfinite=True)
    with pytest.warns(UserWarning, match="no finite gwa/aggregate for epoch 1"):
        fit(model, [gwa, stopper], epochs=5, default_root_dir=tmp_path)
    assert stopper.stopped_epoch == 1 and stopper.stop_reason is StopReason.NONFINITE
    assert math.isnan(stopper.history[1]["gwa"]) and len(stopper.history) == 2
    assert stopper.restored_epoch == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_setup_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a GradientWeightAlignment"):
        fit(Classifier().double(), [GWAEarlyStopping()], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"Valid keys: \['gwa/aggregate'\]"):
        fit(
            Classifier().double(),
            [
                GradientWeightAlignment(),
                GWAEarlyStopping(monitor="gwa_layers/aggregate/head.wieght"),
            ],
            default_root_dir=tmp_path,
        )
    gwa = GradientWeightAlignment(params="all", indices=-1)
    stopper = GWAEarlyStopping(monitor="gwa_layers/aggregate/head.weight", patience=None)
    # the stopper first: the GWA callback's layer names are known only after its setup
    fit(Classifier().double(), [stopper, gwa], epochs=2, default_root_dir=tmp_path)
    assert [h["gwa"] for h in stopper.history] == gwa.layer_history["head.weight"]


class WithNorm(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh())


def test_excluded_weight_is_named_at_the_first_batch(tmp_path: Path) -> None:
    gwa = GradientWeightAlignment(params="features.1.weight", indices=-1)
    stopper = GWAEarlyStopping(patience=None)
    with pytest.warns(UserWarning) as record:
        fit(WithNorm().double(), [gwa, stopper], epochs=1, default_root_dir=tmp_path)
    messages = [str(r.message) for r in record]
    assert any("excluded ['features.1.weight']" in m and "BatchNorm" in m for m in messages)
    assert any("recorded no scores" in m for m in messages)


class WithValidation(Classifier):
    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))


def fit_with_val(model: Classifier, callbacks: list, tmp_path: Path, **kwargs: object) -> None:
    from test_gwa_callback import make_data
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_gradwatch import IndexedDataset

    data = DataLoader(IndexedDataset(TensorDataset(*make_data())), batch_size=16)
    trainer = pl.Trainer(
        max_epochs=4,
        accelerator="cpu",
        precision="64-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        **kwargs,  # type: ignore[arg-type]
    )
    trainer.fit(model, data, data)


@pytest.mark.parametrize("check_val_every_n_epoch", [1, 2])
@pytest.mark.parametrize("flag", [None, True])
def test_core_callbacks_beside_a_validation_loop(
    tmp_path: Path, check_val_every_n_epoch: int, flag: bool | None
) -> None:
    """``epoch=t.ckpt`` must hold epoch t's weights beside epoch t's GWA; a warning names the
    flag whenever the callback could act at validation end."""
    torch.manual_seed(0)
    gwa = GradientWeightAlignment(indices=-1)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path,
        filename="{epoch}",
        monitor="gwa/aggregate",
        mode="max",
        save_top_k=-1,
        save_on_train_epoch_end=flag,
    )
    stopper = EarlyStopping(
        monitor="gwa/aggregate", mode="max", patience=50, check_on_train_epoch_end=flag
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit_with_val(
            WithValidation(lr=2.0).double(),
            [gwa, checkpoint, stopper],
            tmp_path,
            check_val_every_n_epoch=check_val_every_n_epoch,
        )
    messages = [str(r.message) for r in record]
    warned_ckpt = any("save_on_train_epoch_end=True" in m for m in messages)
    warned_stop = any("check_on_train_epoch_end=True" in m for m in messages)
    values = {int(h["epoch"]): h["gwa"] for h in gwa.history}
    consistent = True
    for path in sorted(tmp_path.glob("epoch=*.ckpt")):
        state = torch.load(path, weights_only=False)
        epoch = int(path.stem.split("=")[1])
        scores = [v for v in state["callbacks"].values() if "best_model_score" in v]
        saved_score = float(scores[0]["current_score"]) if scores else math.nan
        # pl_module.log stores the float64 GWA as float32: relative error <= 2**-24
        consistent &= saved_score == pytest.approx(values[epoch], rel=1e-6)
    # Unset flags act at validation end when validation is not at every epoch end: then the
    # saved values lag by one epoch and the warning names the flag.
    at_validation_end = flag is None and check_val_every_n_epoch != 1
    assert consistent != at_validation_end
    assert warned_ckpt == warned_stop == at_validation_end


DDP_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightning_gradwatch import GradientWeightAlignment, GWAEarlyStopping, IndexedDataset

class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=3.0)

out = sys.argv[1]
g = torch.Generator().manual_seed(1)
x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
stopper = GWAEarlyStopping(rule="argmax", patience=3)
# The head is named: this test is about the stopper, not head detection under DDP.
checkpoint = ModelCheckpoint(dirpath=f"{out}/ckpt", filename="{epoch}", save_top_k=-1,
                             save_on_train_epoch_end=True)
trainer = pl.Trainer(
    max_epochs=10, accelerator="cpu", devices=2, strategy="ddp", logger=False,
    callbacks=[GradientWeightAlignment(params="net.2.weight", indices=-1), stopper, checkpoint],
    enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
)
model = Model()
trainer.fit(model, DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=4))
torch.save(model.state_dict(), f"{out}/weights_{trainer.global_rank}.pt")
with open(f"{out}/result_{trainer.global_rank}.json", "w") as f:
    json.dump({"best": stopper.best_epoch, "stopped": stopper.stopped_epoch,
               "restored": stopper.restored_epoch, "history": stopper.history}, f)
"""


@pytest.mark.slow
def test_ddp_ranks_agree_on_the_decision_and_the_weights(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "stop_ddp.py"
    script.write_text(DDP_SCRIPT + DDP_TEARDOWN)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1]
    assert results[0]["restored"] == results[0]["best"] is not None
    weights = [torch.load(tmp_path / f"weights_{r}.pt") for r in (0, 1)]
    saved = weights_of(tmp_path / "ckpt" / f"epoch={results[0]['best']}.ckpt")
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]) and torch.equal(value, saved[name]), name


def test_default_rule_is_the_single_constant() -> None:
    from lightning_gradwatch.callbacks import _stopping_default as default

    stopper = GWAEarlyStopping()
    assert (stopper.rule, stopper.patience, stopper.options) == (
        default.DEFAULT_RULE,
        default.DEFAULT_PATIENCE,
        default.DEFAULT_OPTIONS,
    )
    # A transient peak, the first minimum, the selected rise, then a decline longer than the
    # default patience, whatever that constant is.
    curve = [0.9, 0.3, 0.5, *(0.4 - 0.1 * k for k in range(default.DEFAULT_PATIENCE + 2))]
    stopped, model = drive(stopper, curve)
    history = [{"gwa": v} for v in curve]
    assert stopper.best_epoch == select_epoch(history, default.DEFAULT_RULE) == 2
    assert stopped == 2 + default.DEFAULT_PATIENCE and float(model.weight) == 2.0
    gwa = GradientWeightAlignment()
    gwa.history = [{"epoch": float(e), "gwa": v} for e, v in enumerate(curve)]
    assert gwa.best_epoch() == 2 and gwa.best_epoch("argmax") == 0


def test_no_selected_epoch_keeps_the_last_weights_and_says_so() -> None:
    stopper = GWAEarlyStopping(rule="max_after_first_min", patience=2)
    with pytest.warns(UserWarning, match="selected no epoch"):
        stopped, model = drive(stopper, [0.5, 0.4, 0.3])
    assert stopped is None and stopper.best_epoch is None and float(model.weight) == 2.0


def test_former_monitor_names_are_read_as_the_current_ones() -> None:
    """Runs configured before the naming scheme keep working, told the new name."""
    with pytest.warns(UserWarning, match="now logged as 'gwa/aggregate'"):
        assert GWAEarlyStopping(monitor="gwa/epoch").monitor == "gwa/aggregate"
    with pytest.warns(UserWarning, match="now logged as 'gwa_layers/aggregate/head.weight'"):
        stopper = GWAEarlyStopping(monitor="gwa/layer/head.weight")
    assert stopper.monitor == "gwa_layers/aggregate/head.weight"


def test_registers_itself_as_the_epoch_selector(tmp_path: Path) -> None:
    """``most_misaligned(epoch="best")`` follows the stopper through the public contract."""
    torch.manual_seed(0)
    gwa = GradientWeightAlignment(indices=-1)
    stopper = GWAEarlyStopping(rule="argmax", patience=None)
    fit(Classifier().double(), [gwa, stopper], epochs=3, default_root_dir=tmp_path)
    assert gwa.epoch_selector is stopper and gwa.mode == "head"
    assert stopper.best_epoch is not None
    expected = gwa.most_misaligned(5, epoch=stopper.best_epoch)
    assert torch.equal(gwa.most_misaligned(5), expected)
