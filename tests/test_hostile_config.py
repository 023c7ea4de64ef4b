"""Hostile configurations: strategies, loops, resume points and several instances. Each case is
either exact (compared with the single-process run or the uninterrupted run) or refused with a
message that says what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from ddp_scripts import DDP_TEARDOWN
from lightning.pytorch import strategies
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import (
    EBEarlyStopping,
    GradientSNR,
    GradientWeightAlignment,
    GWAEarlyStopping,
    IndexedDataset,
    SpectralNorms,
)
from lightning_gradwatch.callbacks._strategies import (
    SHARDED_STRATEGY_NAMES,
    refuse_sharded_strategy,
)

N, D, H, K = 48, 6, 8, 4

DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import Callback
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from lightning_gradwatch import GradientWeightAlignment, IndexedDataset

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
            # lr = 0: every sample's score is independent of the rank and batch it lands in
            return torch.optim.SGD(self.parameters(), lr=0.0)

    class Dump(Callback):
        # Written from inside the worker: under ddp_spawn the callbacks of the launching
        # process never see the workers' state.
        def __init__(self, gwa, out, tag):
            self.gwa, self.out, self.tag = gwa, out, tag

        def on_fit_end(self, trainer, pl_module):
            result = {
                "head": self.gwa.head_name,
                "history": self.gwa.history,
                "index": self.gwa.sample_scores()["index"].tolist(),
                "scores": self.gwa.sample_scores()["score"].tolist(),
            }
            with open(f"{self.out}/{self.tag}_{trainer.global_rank}.json", "w") as f:
                json.dump(result, f)

    def main(out, strategy, devices):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(40, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (40,), generator=g)
        gwa = GradientWeightAlignment(params="head", indices=-1)
        trainer = pl.Trainer(
            max_epochs=2, accelerator="cpu", devices=devices, strategy=strategy,
            precision="64-true", callbacks=[gwa, Dump(gwa, out, f"{strategy}_{devices}")],
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=out,
        )
        loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=4, shuffle=False)
        trainer.fit(Model(), loader)

    def resume(out, ckpt):
        # 40 samples, 2 ranks, batches of 4: 5 steps per epoch; step 4 is mid-epoch 0
        from lightning.pytorch.callbacks import ModelCheckpoint
        g = torch.Generator().manual_seed(1)
        x = torch.randn(40, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (40,), generator=g)
        loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=4, shuffle=False)
        common = dict(
            accelerator="cpu", devices=2, strategy="ddp", precision="64-true", logger=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        )
        if ckpt == "-":
            saver = ModelCheckpoint(dirpath=out, every_n_train_steps=2, filename="{step}")
            pl.Trainer(max_epochs=1, callbacks=[GradientWeightAlignment(indices=-1), saver],
                       **common).fit(Model(), loader)
        else:
            pl.Trainer(max_epochs=1, callbacks=[GradientWeightAlignment(indices=-1)],
                       enable_checkpointing=False, **common).fit(Model(), loader, ckpt_path=ckpt)

    if __name__ == "__main__":
        if sys.argv[2] == "resume":
            resume(sys.argv[1], sys.argv[3])
        else:
            main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    """
)


def _run_script(script: Path, *args: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("LOCAL_RANK", None)
    for _attempt in range(2):
        proc = subprocess.run(
            [sys.executable, str(script), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=script.parent,
        )
        # A ddp_spawn worker is a multiprocessing child: the script's teardown (DDP_TEARDOWN)
        # runs in the launcher only, and gloo's threads can abort the worker as it exits,
        # after its work and its output file are done. That crash is gloo's, not a result:
        # run once more rather than fail on it (any other failure is returned at once).
        if proc.returncode == 0 or _GLOO_EXIT_ABORT not in proc.stderr:
            return proc
    return proc


_GLOO_EXIT_ABORT = "terminate called without an active exception"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_head_mode_under_ddp_equals_single_process(tmp_path: Path, strategy: str) -> None:
    """The head is found through Lightning's DDP wrapper, and under ddp_spawn every rank
    accumulates into its own storage: each epoch counts the 40 samples once."""
    script = tmp_path / "ddp_head.py"
    script.write_text(DDP_SCRIPT + DDP_TEARDOWN)
    for args in (("auto", "1"), (strategy, "2")):
        proc = _run_script(script, str(tmp_path), *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "auto_1_0.json").read_text())
    assert single["head"] == "net.2.weight"
    for rank in (0, 1):
        ddp = json.loads((tmp_path / f"{strategy}_2_{rank}.json").read_text())
        assert ddp["head"] == "net.2.weight"
        assert [h["count"] for h in ddp["history"]] == [40.0, 40.0]
        # float64 model: rtol 1e-6 as for every float64 comparison with a reference
        for mine, ref in zip(ddp["history"], single["history"], strict=True):
            for key in ("gwa", "mean", "kurtosis"):
                assert mine[key] == pytest.approx(ref[key], rel=1e-6)
        assert ddp["index"] == single["index"] == list(range(40))
        assert ddp["scores"] == pytest.approx(single["scores"], rel=1e-6, abs=1e-12)


@pytest.mark.slow
def test_ddp_resume_of_a_partial_epoch_is_refused(tmp_path: Path) -> None:
    """The checkpoint holds rank zero's partial sums only: resuming them under DDP would count
    rank zero's samples twice and rank one's never, so it is refused at the start."""
    script = tmp_path / "ddp_resume.py"
    script.write_text(DDP_SCRIPT + DDP_TEARDOWN)
    proc = _run_script(script, str(tmp_path), "resume", "-")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run_script(script, str(tmp_path), "resume", str(tmp_path / "step=4.ckpt"))
    assert proc.returncode != 0
    assert "RuntimeError: GradientWeightAlignment: this run resumes" in proc.stderr
    assert "only rank zero's partial sums" in proc.stderr
    assert "save_on_train_epoch_end=True" in proc.stderr


# ----------------------------------------------------------------------------- state keys
class _Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(D, H), nn.Tanh())
        self.head = nn.Linear(H, K)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader(batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g)
    return DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=batch_size)


def _trainer(tmp_path: Path, callbacks: list, **kwargs: object) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 2)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="64-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,  # type: ignore[arg-type]
    )


def test_every_callback_has_a_state_key_from_its_arguments() -> None:
    pairs = [
        (GradientWeightAlignment(), GradientWeightAlignment(params="all")),
        (GradientWeightAlignment(params="head.weight"), GradientWeightAlignment(params="head")),
        (GradientSNR(), GradientSNR(params=["head.weight"])),
        (EBEarlyStopping(window=5), EBEarlyStopping(window=10)),
        (SpectralNorms(), SpectralNorms(params=["head.*"])),
        (GWAEarlyStopping(), GWAEarlyStopping(monitor="gwa_layers/aggregate/head.weight")),
    ]
    for first, second in pairs:
        assert first.state_key != second.state_key, type(first).__name__
        assert first.state_key.startswith(type(first).__qualname__)
    # stable across instances (a resumed run builds new ones), callables included
    assert (
        GradientWeightAlignment(indices=_index_of).state_key
        == GradientWeightAlignment(indices=_index_of).state_key
    )


def _index_of(batch: Any) -> Tensor:
    return batch[-1]


def test_two_gwa_instances_keep_their_own_checkpoint_state(tmp_path: Path) -> None:
    head, every = GradientWeightAlignment(indices=-1), GradientWeightAlignment("all", indices=-1)
    trainer = _trainer(tmp_path, [head, every])
    trainer.fit(_Classifier().double(), _loader())
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = [GradientWeightAlignment(indices=-1), GradientWeightAlignment("all", indices=-1)]
    _trainer(tmp_path, resumed, max_epochs=2).fit(
        _Classifier().double(), _loader(), ckpt_path=tmp_path / "two.ckpt"
    )
    assert resumed[0].history == head.history and resumed[1].history == every.history
    assert resumed[0].head_name == "head.weight" and not resumed[0].layer_history
    assert set(resumed[1].layer_history) == {"features.0.weight", "head.weight"}
    assert head.history != every.history


# ----------------------------------------------------------------------------- resume points
class ResumableLoader(DataLoader):
    """A DataLoader that Lightning can resume mid-epoch (``state_dict``/``load_state_dict``):
    it skips the batches the interrupted run already consumed in the epoch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumed = 0
        self.skip = 0

    def __iter__(self) -> Any:
        skip, self.skip, self.consumed = self.skip, 0, 0
        for position, batch in enumerate(super().__iter__()):
            if position >= skip:
                self.consumed = position + 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # an exhausted epoch resumes with a fresh one, as torchdata's StatefulDataLoader does
        self.skip = state["consumed"] % len(self)


def _resumable_loader() -> ResumableLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g)
    return ResumableLoader(IndexedDataset(TensorDataset(x, y)), batch_size=16)


@pytest.mark.parametrize(
    "step",
    [3, 4, 6],  # 3 batches per epoch: after the last batch of epochs 0 and 1, and mid-epoch 1
)
def test_resumed_run_equals_the_uninterrupted_run(tmp_path: Path, step: int) -> None:
    def gwa() -> GradientWeightAlignment:
        return GradientWeightAlignment(params=["features.0.weight", "head.weight"], indices=-1)

    straight = gwa()
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}"
    )
    _trainer(tmp_path, [straight, checkpoint], max_epochs=3).fit(
        _Classifier().double(), _resumable_loader()
    )
    resumed = gwa()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PossibleUserWarning)  # the loader does resume
        _trainer(tmp_path, [resumed], max_epochs=3).fit(
            _Classifier().double(), _resumable_loader(), ckpt_path=tmp_path / f"step={step}.ckpt"
        )
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert [h["count"] for h in resumed.history] == [N, N, N]
    for mine, ref in zip(resumed.history, straight.history, strict=True):
        for key in ("gwa", "mean", "kurtosis"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-9)
    for name, values in straight.layer_history.items():
        assert resumed.layer_history[name] == pytest.approx(values, rel=1e-9)
    torch.testing.assert_close(resumed.score_history(), straight.score_history())


# ----------------------------------------------------------------------------- loops
class GAN(pl.LightningModule):
    """Manual optimisation with two backward passes per batch: the generator's loss goes
    through the discriminator, so both backward passes reach the discriminator's head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(3, D), nn.Tanh())
        self.discriminator = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, 2))

    def noise(self, x: Tensor) -> Tensor:
        return x[:, :3].flip(1)  # deterministic "noise", one row per sample

    def discriminator_loss(self, x: Tensor) -> Tensor:
        """``(B,)`` per-sample losses: real rows are class 1."""
        return F.cross_entropy(
            self.discriminator(x), torch.ones(len(x), dtype=torch.long), reduction="none"
        )

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        g_opt, d_opt = self.optimizers()  # type: ignore[misc]
        fake = self.generator(self.noise(batch[0]))
        g_loss = F.cross_entropy(self.discriminator(fake), torch.ones(len(fake), dtype=torch.long))
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        d_opt.zero_grad()
        self.manual_backward(self.discriminator_loss(batch[0]).mean())
        d_opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        # lr = 0: the scores of the discriminator's pass can be checked sample by sample
        return [
            torch.optim.SGD(self.generator.parameters(), lr=0.0),
            torch.optim.SGD(self.discriminator.parameters(), lr=0.0),
        ]


def test_two_backward_passes_per_batch_need_a_choice(tmp_path: Path) -> None:
    ambiguous = GradientWeightAlignment(params="discriminator.2.weight", indices=-1)
    with pytest.raises(RuntimeError, match="backward passes 0 and 1") as caught:
        _trainer(tmp_path, [ambiguous], max_epochs=1).fit(GAN().double(), _loader())
    assert "training batch 0" in str(caught.value) and "backward=<k>" in str(caught.value)

    chosen = GradientWeightAlignment(params="discriminator.2.weight", indices=-1, backward=1)
    model = GAN().double()
    _trainer(tmp_path, [chosen], max_epochs=2).fit(model, _loader())
    assert [h["count"] for h in chosen.history] == [N, N]  # each sample once per epoch
    # oracle: one backward per sample of the discriminator's loss, float64
    x = next(iter(_loader(batch_size=N)))[0]
    weight = model.discriminator[2].weight
    losses = model.discriminator_loss(x)
    expected = torch.stack(
        [
            F.cosine_similarity(
                -torch.autograd.grad(loss, weight, retain_graph=True)[0].flatten(),
                weight.detach().flatten(),
                dim=0,
            )
            for loss in losses
        ]
    )
    torch.testing.assert_close(chosen.sample_scores()["score"], expected, rtol=1e-6, atol=1e-12)


def test_backward_argument_is_validated() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="0-based index of the backward pass"):
            GradientWeightAlignment(backward=bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- sharded strategies
@pytest.mark.parametrize("name", SHARDED_STRATEGY_NAMES)
def test_sharded_strategies_are_refused_at_setup(name: str) -> None:
    """Lightning builds FSDP only on GPUs and DeepSpeed only with deepspeed installed, so the
    strategy object is made without its __init__: the refusal looks only at its class."""
    strategy_type = getattr(strategies, name, None)
    if strategy_type is None:
        pytest.skip(f"this Lightning has no {name}")

    class Sharded(strategy_type):  # type: ignore[misc, valid-type]
        """A user subclass is refused too."""

    for cls in (strategy_type, Sharded):
        trainer = SimpleNamespace(strategy=object.__new__(cls), loggers=[object()])
        for callback in (GradientWeightAlignment(), GradientSNR(), SpectralNorms()):
            with pytest.raises(ValueError, match=f"under {cls.__name__}") as caught:
                callback.setup(trainer, _Classifier(), "fit")  # type: ignore[arg-type]
            message = str(caught.value)
            assert "shards the parameters" in message and "strategy='ddp'" in message


def test_replicating_strategies_are_not_refused() -> None:
    for strategy in (strategies.SingleDeviceStrategy("cpu"), strategies.DDPStrategy()):
        refuse_sharded_strategy(strategy, "GradientWeightAlignment")
