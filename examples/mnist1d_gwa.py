"""Early stopping without a validation set, and finding mislabelled samples, with GWA.

A small 1-D CNN learns MNIST-1D (generated locally by ``mnist1d.data.make_dataset``; nothing is
downloaded) whose training labels have 30% symmetric noise: each corrupted label is replaced by
a different class chosen uniformly. It trains long enough to memorise the noise, so the clean
test accuracy rises and then falls. Three runs, same seed:

1. the README's set-up: ``GradientWeightAlignment`` + ``GWAEarlyStopping()`` (default rule,
   restore the best weights) on 100% of the training set. What the user gets is the model
   after ``fit``: its clean test accuracy is measured on the model itself;
2. the same training for all epochs, for the paper's post-hoc rule (argmax of ``gwa/aggregate``
   over the fixed-length run), the last epoch and the oracle (best clean test epoch, not
   available in practice). Training is deterministic, so its first epochs are run 1's;
3. a 10% validation split (noisy labels, as a practitioner would have), trained on the other
   90%: the epoch of best validation accuracy.

Below the table: the AUROC of ``-gamma`` (per-sample mean score over the selected epoch, and
over the last epoch) for flagging the corrupted labels. TensorBoard logs go to
``runs/mnist1d_gwa`` (``tensorboard --logdir runs/mnist1d_gwa``).

Run: ``python examples/mnist1d_gwa.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from mnist1d.data import get_dataset_args, make_dataset
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientWeightAlignment, GWAEarlyStopping, IndexedDataset

NUM_CLASSES = 10


@dataclass
class NoisyMNIST1D:
    x: Tensor  # (N, 1, 40) float32
    y_noisy: Tensor  # (N,) labels used for training
    y_clean: Tensor  # (N,)
    x_test: Tensor
    y_test: Tensor  # clean

    @property
    def corrupted(self) -> Tensor:
        return self.y_noisy != self.y_clean


def load_data(noise: float, seed: int) -> NoisyMNIST1D:
    """MNIST-1D with its default arguments (4000 train / 1000 test), generated locally; a
    fraction ``noise`` of the training labels flipped to a different uniformly random class."""
    data = make_dataset(get_dataset_args())
    x = torch.tensor(data["x"], dtype=torch.float32)[:, None]
    y = torch.tensor(data["y"], dtype=torch.int64)
    rng = np.random.default_rng(seed)
    flip = rng.permutation(len(y))[: round(noise * len(y))]
    y_noisy = y.clone()
    offsets = torch.tensor(rng.integers(1, NUM_CLASSES, len(flip)), dtype=torch.int64)
    y_noisy[flip] = (y[flip] + offsets) % NUM_CLASSES
    x_test = torch.tensor(data["x_test"], dtype=torch.float32)[:, None]
    y_test = torch.tensor(data["y_test"], dtype=torch.int64)
    return NoisyMNIST1D(x, y_noisy, y, x_test, y_test)


class CNN1D(pl.LightningModule):
    """Three 1-D convolutions, a hidden linear layer, and the linear head that GWA scores."""

    def __init__(self, lr: float = 1e-3, width: int = 32) -> None:
        super().__init__()
        self.lr = lr
        self.features = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(width * 10, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, _ = batch  # IndexedDataset appends the dataset index
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class EpochAccuracy(Callback):
    """Records (and logs) accuracy on held-out sets at the end of every training epoch, in
    eval mode without gradients: it does not touch training (no RNG, no parameters)."""

    def __init__(self, sets: dict[str, tuple[Tensor, Tensor]]) -> None:
        self.sets = sets
        self.history: dict[str, list[float]] = {name: [] for name in sets}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            for name, (x, y) in self.sets.items():
                accuracy = float((pl_module(x).argmax(-1) == y).float().mean())
                self.history[name].append(accuracy)
                pl_module.log(f"{name}/accuracy", accuracy, on_step=False, on_epoch=True)
        pl_module.train(was_training)


def train(
    x: Tensor,
    y: Tensor,
    sets: dict[str, tuple[Tensor, Tensor]],
    seed: int,
    epochs: int,
    gwa_callbacks: list[Callback],
    logdir: str | None,
    name: str,
    batch_size: int = 128,
) -> tuple[EpochAccuracy, CNN1D]:
    pl.seed_everything(seed, workers=True, verbose=False)
    accuracy = EpochAccuracy(sets)
    logger = TensorBoardLogger(logdir, name=name) if logdir else False
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[accuracy, *gwa_callbacks],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        deterministic=True,
    )
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=batch_size, shuffle=True)
    model = CNN1D()
    trainer.fit(model, loader)
    return accuracy, model


def clean_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Accuracy of ``model`` as it is now (eval mode, no gradients)."""
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def run_experiment(
    seed: int = 0, noise: float = 0.3, epochs: int = 40, logdir: str | None = None
) -> dict[str, Any]:
    """The three training runs for one seed and noise rate; returns the selected epochs, their
    clean test accuracies and the AUROCs."""
    data = load_data(noise, seed)
    test = (data.x_test, data.y_test)

    # 1. The README's set-up: the stopper picks the epoch, stops, and restores its weights.
    gwa_stopped = GradientWeightAlignment(indices=-1)
    stopper = GWAEarlyStopping()
    _, model = train(
        data.x, data.y_noisy, {}, seed, epochs, [gwa_stopped, stopper], logdir, "gwa_stopper"
    )
    stopped_accuracy = clean_accuracy(model, *test)
    epochs_trained = len(gwa_stopped.history)

    # 2. All epochs: the paper's post-hoc argmax, the last epoch, the oracle.
    gwa = GradientWeightAlignment(indices=-1)
    run, _ = train(data.x, data.y_noisy, {"test": test}, seed, epochs, [gwa], logdir, "gwa_full")
    test_acc = np.array(run.history["test"])
    argmax_epoch = gwa.best_epoch("argmax")

    # 3. Validation split: 10% of the (noisy) training set held out, train on the other 90%.
    order = torch.from_numpy(np.random.default_rng(seed + 1000).permutation(len(data.x)))
    n_val = len(order) // 10
    val_idx, train_idx = order[:n_val], order[n_val:]
    split, _ = train(
        data.x[train_idx],
        data.y_noisy[train_idx],
        {"val": (data.x[val_idx], data.y_noisy[val_idx]), "test": test},
        seed,
        epochs,
        [],
        logdir,
        "validation_split",
    )
    val_acc = np.array(split.history["val"])
    split_test = np.array(split.history["test"])
    val_epoch = int(np.argmax(val_acc))

    corrupted = data.corrupted.numpy()
    auroc = {}
    if 0 < noise < 1:
        for label, epoch in (("selected", "best"), ("last", "last")):
            # most_misaligned ranks every scored sample of that epoch, lowest score first.
            ranked = gwa_stopped.most_misaligned(len(data.x), epoch=epoch).numpy()
            suspicion = np.empty(len(data.x))
            suspicion[ranked] = np.arange(len(ranked), 0, -1)
            auroc[label] = float(roc_auc_score(corrupted, suspicion))
    last = len(test_acc) - 1
    oracle = int(np.argmax(test_acc))
    return {
        "seed": seed,
        "noise": noise,
        "rows": {
            f"GWAEarlyStopping() (default rule), model after fit; trained {epochs_trained} "
            f"epochs": (stopper.best_epoch, stopped_accuracy),
            "paper rule: argmax of gwa/aggregate over the full run": (
                argmax_epoch,
                float(test_acc[argmax_epoch]) if argmax_epoch is not None else float("nan"),
            ),
            "10% validation split (trained on 90%), best val accuracy": (
                val_epoch,
                float(split_test[val_epoch]),
            ),
            "last epoch": (last, float(test_acc[last])),
            "oracle (best test epoch)": (oracle, float(test_acc[oracle])),
        },
        "stop_reason": stopper.stop_reason.value,
        "auroc": auroc,
        "gwa_curve": [h["gwa"] for h in gwa.history],
        "test_curve": test_acc.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--logdir", default="runs/mnist1d_gwa")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 is fastest for this tiny model on a small or busy CPU",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run_experiment(args.seed, args.noise, args.epochs, args.logdir)
    print(
        f"\nMNIST-1D, {args.noise:.0%} symmetric label noise, seed {args.seed}, "
        f"{args.epochs} epochs (epochs counted from 0)\n"
    )
    print("| selection rule | epoch | clean test accuracy |")
    print("|---|---|---|")
    for rule, (epoch, accuracy) in result["rows"].items():
        print(f"| {rule} | {epoch} | {accuracy:.2%} |")
    auroc = result["auroc"]
    if auroc:
        print(
            f"\nAUROC of -gamma for flagging the corrupted labels: {auroc['selected']:.3f} "
            f"(scores of the selected epoch), {auroc['last']:.3f} (scores of the last epoch)"
        )
    print(
        f"\nTensorBoard: tensorboard --logdir {args.logdir}   ({time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
