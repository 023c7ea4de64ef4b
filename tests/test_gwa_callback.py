"""GradientWeightAlignment in real Lightning runs: exactness against the paper's closed form and
the brute-force oracle, head detection, logging, attribution, state, and no interference."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from oracle import per_sample_grads
from scipy import stats
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientWeightAlignment, IndexedDataset

N, D, H, K = 48, 6, 8, 4


def make_data(seed: int = 0, n: int = N) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randint(
        0, K, (n,), generator=g
    )


class Classifier(pl.LightningModule):
    """MLP classifier; ``targets`` chooses hard labels, label smoothing or mixup soft labels."""

    def __init__(self, targets: str = "hard", lr: float = 0.1, head_scale: float = 1.0) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(D, H), nn.Tanh())
        self.head = nn.Linear(H, K)
        self.targets, self.lr = targets, lr

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def soft_targets(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and the target distribution the loss uses."""
        onehot = F.one_hot(y, K).to(x.dtype)
        if self.targets == "smooth":
            return x, onehot * 0.9 + 0.1 / K
        if self.targets == "mixup":
            lam = torch.linspace(0.3, 0.9, len(x), dtype=x.dtype)[:, None]
            return lam * x + (1 - lam) * x.flip(0), lam * onehot + (1 - lam) * onehot.flip(0)
        return x, onehot

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        x, target = self.soft_targets(x, y)
        if self.targets == "smooth":
            return F.cross_entropy(self(x), y, label_smoothing=0.1)
        if self.targets == "mixup":
            return F.cross_entropy(self(x), target)
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(
    model: pl.LightningModule,
    callbacks: list,
    epochs: int = 1,
    batch_size: int = 16,
    indexed: bool = True,
    logger: object = False,
    dataset: TensorDataset | None = None,
    **trainer_kwargs: object,
) -> pl.Trainer:
    dataset = dataset if dataset is not None else TensorDataset(*make_data())
    data = IndexedDataset(dataset) if indexed else dataset
    trainer_kwargs.setdefault("enable_checkpointing", False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        precision="64-true",
        logger=logger,  # type: ignore[arg-type]
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **trainer_kwargs,  # type: ignore[arg-type]
    )
    trainer.fit(model, DataLoader(data, batch_size=batch_size, shuffle=False))
    return trainer


def closed_form(model: Classifier, x: Tensor, y: Tensor) -> Tensor:
    """The paper: ``-(p_i - y_i)^T W h_i / (|p_i - y_i| |h_i| |W|_F)``, soft labels included."""
    with torch.no_grad():
        x, target = model.soft_targets(x, y)
        if model.targets == "smooth":
            target = F.one_hot(y, K).to(x.dtype) * 0.9 + 0.1 / K
        h = model.features(x)
        p = model(x).softmax(-1)
        w = model.head.weight
        r = p - target
        num = -(r * (h @ w.T)).sum(1)
        return num / (r.norm(dim=1) * h.norm(dim=1) * w.norm())


def frozen(targets: str = "hard") -> Classifier:
    """lr = 0: the weights stay as at the start, so every batch sees the same model."""
    torch.manual_seed(0)
    return Classifier(targets=targets, lr=0.0).double()


@pytest.mark.parametrize("targets", ["hard", "smooth", "mixup"])
def test_head_scores_equal_closed_form_and_aggregate_equals_scipy(targets: str) -> None:
    model = frozen(targets)
    reference = copy.deepcopy(model)
    gwa = GradientWeightAlignment(indices=-1)
    fit(model, [gwa], epochs=1, accumulate_grad_batches=2)  # micro-batches all count
    assert gwa.head_name == "head.weight"
    x, y = make_data()
    if targets == "mixup":
        # mixup mixes within each batch of 16: compute the closed form batch by batch
        expected = torch.cat(
            [closed_form(reference, x[i : i + 16], y[i : i + 16]) for i in range(0, N, 16)]
        )
    else:
        expected = closed_form(reference, x, y)
    table = gwa.sample_scores()
    assert table["index"].tolist() == list(range(N))
    torch.testing.assert_close(table["score"], expected, rtol=1e-5, atol=1e-12)
    entry = gwa.history[-1]
    scores = expected.numpy()
    assert entry["count"] == N
    assert entry["kurtosis"] == pytest.approx(stats.kurtosis(scores), rel=1e-6)
    assert entry["gwa"] == pytest.approx(scores.mean() / (stats.kurtosis(scores) + 1.2), rel=1e-6)


def test_all_layer_scores_equal_oracle() -> None:
    model = frozen()
    reference = copy.deepcopy(model)
    gwa = GradientWeightAlignment(params="all", indices=-1)
    trainer = fit(model, [gwa])
    x, y = make_data()
    names = ["features.0.weight", "head.weight"]
    grads = per_sample_grads(
        reference, lambda out, t: F.cross_entropy(out, t, reduction="none"), x, y, names
    )
    params = dict(reference.named_parameters())
    flat_g = torch.cat([grads[n].flatten(1) for n in names], 1)
    flat_w = torch.cat([params[n].detach().flatten() for n in names])
    expected = -(flat_g @ flat_w) / (flat_g.norm(dim=1) * flat_w.norm())
    torch.testing.assert_close(gwa.sample_scores()["score"], expected, rtol=1e-6, atol=1e-12)
    for name in names:
        g = grads[name].flatten(1)
        w = params[name].detach().flatten()
        layer = (-(g @ w) / (g.norm(dim=1) * w.norm())).numpy()
        want = layer.mean() / (stats.kurtosis(layer) + 1.2)
        assert gwa.layer_history[name][-1] == pytest.approx(want, rel=1e-6)
        assert float(trainer.callback_metrics[f"gwa_layers/aggregate/{name}"]) == pytest.approx(
            want, 1e-6
        )
    assert "gwa_layers/aggregate/features.0.bias" not in trainer.callback_metrics


class Wrapped(Classifier):
    """Head inside a Sequential; an auxiliary Linear runs after it on the side."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, K))
        self.aux = nn.Linear(H, 1)
        del self.features, self.head

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self.net(x)
        side = self.aux(self.net[1](self.net[0](x))).mean()
        return F.cross_entropy(logits, y) + 0.0 * side


class Scaled(Classifier):
    def forward(self, x: Tensor) -> Tensor:
        return 2.0 * self.head(self.features(x))


class NoLinear(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(1, K, D))
        del self.head

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x[:, None]).flatten(1)


def test_head_detection() -> None:
    gwa = GradientWeightAlignment(indices=None)
    fit(Wrapped().double(), [gwa], epochs=2)
    assert gwa.head_name == "net.2.weight"
    assert gwa.probe is not None and gwa.probe.param_names == ["net.2.weight"]
    assert gwa.history[-1]["count"] == N  # the detection batch counts too
    explicit = GradientWeightAlignment(params="aux.weight", indices=None)
    fit(Wrapped().double(), [explicit])
    assert explicit.score_names == ["aux.weight"]


def test_head_detection_failures_say_how_to_fix() -> None:
    with pytest.raises(RuntimeError, match=r"params='head\.weight'"):
        fit(Scaled().double(), [GradientWeightAlignment(indices=None)])
    with pytest.raises(ValueError, match=r"no trainable nn\.Linear"):
        fit(NoLinear().double(), [GradientWeightAlignment(indices=None)])
    with pytest.raises(ValueError, match="unknown parameter names"):
        fit(Classifier().double(), [GradientWeightAlignment(params="head.wieght")])


def test_logging_tensorboard_histogram_and_schedule(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    gwa = GradientWeightAlignment(params="all", indices=-1, write_scores=True)
    trainer = fit(Classifier().double(), [gwa], epochs=2, logger=logger, log_every_n_steps=2)
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for key in ("gwa/aggregate", "gwa/mean", "gwa/kurtosis", "gwa_layers/aggregate/head.weight"):
        values = [e.value for e in events.Scalars(key)]
        assert len(values) == 2
    assert [e.value for e in events.Scalars("gwa/aggregate")] == pytest.approx(
        [h["gwa"] for h in gwa.history], rel=1e-6
    )
    assert len(events.Scalars("gwa/step_mean")) == 3  # 6 steps, every 2nd
    histograms = events.Histograms("gwa/scores")
    assert len(histograms) == 2 and histograms[-1].histogram_value.num == N
    assert "gwa/scores" in tags["histograms"]
    files = sorted((tmp_path / "run" / "version_0" / "gwa_scores").iterdir())
    assert [f.name for f in files] == ["epoch_0000.csv", "epoch_0001.csv"]
    rows = np.loadtxt(files[-1], delimiter=",", skiprows=1)
    np.testing.assert_allclose(rows[:, 1], gwa.score_history()[-1].numpy(), rtol=1e-6)
    assert trainer.callback_metrics["gwa/aggregate"] == pytest.approx(gwa.history[-1]["gwa"], 1e-6)


def test_no_logger_warns_once_and_works() -> None:
    gwa = GradientWeightAlignment(indices=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(Classifier().double(), [gwa], epochs=2)
    messages = [str(w.message) for w in caught if "no logger" in str(w.message)]
    assert len(messages) == 1
    assert len(gwa.history) == 2 and "gwa/aggregate" in trainer.callback_metrics


def test_attribution_api_and_history() -> None:
    torch.manual_seed(0)
    x, y = make_data()
    y[:5] = (y[:5] + 1) % K  # flipped labels after a few epochs of fitting the rest
    gwa = GradientWeightAlignment(indices=-1)
    fit(Classifier(lr=0.5).double(), [gwa], epochs=3, dataset=TensorDataset(x, y))
    table = gwa.sample_scores()
    history = gwa.score_history()
    assert history.shape == (3, N)
    # every sample is seen once per epoch, so its epoch mean is its score of that epoch
    torch.testing.assert_close(table["epoch_mean"], history[-1].double())
    torch.testing.assert_close(table["score"], history[-1].double())
    worst = gwa.most_misaligned(5, epoch="last")
    assert worst.shape == (5,)
    assert torch.all(table["score"][worst] <= table["score"].sort().values[4])
    import pandas as pd

    assert len(pd.DataFrame({k: v.numpy() for k, v in table.items()})) == N


def test_missing_indices_warn_and_scores_still_aggregate() -> None:
    gwa = GradientWeightAlignment()  # default key "index", but tuple batches
    with pytest.warns(UserWarning, match="IndexedDataset"):
        fit(Classifier().double(), [gwa], indexed=False)
    assert gwa.sample_scores()["index"].numel() == 0 and gwa.history[-1]["count"] == N


def test_monitoring_does_not_change_training() -> None:
    def run(callbacks: list) -> dict[str, Tensor]:
        torch.manual_seed(0)
        model = Classifier(lr=0.3).double()
        fit(model, callbacks, epochs=2, accumulate_grad_batches=2)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    plain = run([])
    watched = run([GradientWeightAlignment(params="all", indices=-1)])
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


def test_resumed_run_continues_the_epoch_series(tmp_path) -> None:
    def trainer_for(epochs: int, callbacks: list) -> Callable[..., pl.Trainer]:
        return pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            precision="64-true",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            default_root_dir=tmp_path,
        )

    loader = DataLoader(IndexedDataset(TensorDataset(*make_data())), batch_size=16)
    torch.manual_seed(0)
    straight = GradientWeightAlignment(indices=-1)
    trainer_for(4, [straight]).fit(Classifier(lr=0.3).double(), loader)

    torch.manual_seed(0)
    first = GradientWeightAlignment(indices=-1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer_for(2, [first, checkpoint]).fit(Classifier(lr=0.3).double(), loader)
    resumed = GradientWeightAlignment(indices=-1)
    trainer_for(4, [resumed]).fit(
        Classifier(lr=0.3).double(), loader, ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    for a, b in zip(resumed.history, straight.history, strict=True):
        assert a["gwa"] == pytest.approx(b["gwa"], rel=1e-9)
    assert resumed.head_name == "head.weight"
    torch.testing.assert_close(resumed.score_history(), straight.score_history())


def test_scores_histogram_spans_the_range_the_scores_fill(tmp_path) -> None:
    """The written ``gwa/scores`` histogram covers the epoch's scores, not ``[-1, 1]``: its
    range is the scores' own to within one 5e-4 bin of the state, with every sample counted."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    gwa = GradientWeightAlignment(indices=-1, histogram_bins=20)
    fit(Classifier().double(), [gwa], epochs=2, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    for written, scores in zip(
        events.Histograms("gwa/scores"), gwa.score_history(), strict=True
    ):  # each sample is seen once per epoch: its epoch mean is its score
        histogram = written.histogram_value
        low, high = float(scores.min()), float(scores.max())
        assert high - low < 1.0  # the data fill a fraction of [-1, 1]
        assert low - 5e-4 - 1e-9 <= histogram.min <= low
        assert high <= histogram.max <= high + 5e-4 + 1e-9
        assert len(histogram.bucket) <= 20 and sum(histogram.bucket) == N
        limits = list(histogram.bucket_limit)
        assert limits[-1] == pytest.approx(histogram.max)
        assert limits == sorted(limits)
