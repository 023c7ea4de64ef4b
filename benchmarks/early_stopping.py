"""Study of GWA epoch-selection and early-stopping rules against a noisy validation split.

For every dataset x architecture x label-noise rate x seed it runs, with the real Lightning
callbacks:

1. a fixed-length run on 100% of the (noisy) training set with ``GradientWeightAlignment``
   (head weight, scores taken on each training batch before the optimizer step), recording per
   epoch ``gwa``, ``mean``, ``kurtosis``, the clean test accuracy and the AUROC of ``-score``
   (each sample's epoch-mean score) for flagging the mislabelled samples;
2. the usual user set-up: 90% of the noisy training set, a 10% noisy validation split,
   Lightning's ``EarlyStopping(monitor="val/loss", patience=VAL_PATIENCE)`` and
   ``ModelCheckpoint(monitor="val/loss", save_top_k=1)``; it records the clean test accuracy of
   the best checkpoint (the model the user would load) and the epochs trained.

Offline, every candidate rule of ``lightning_gradwatch.functional.stopping`` is replayed on the
recorded GWA history as an online stopper with restore-best (the model the user gets is the
weights of the epoch selected when it stopped, or at the end of the fixed-length run), next to
the paper's post-hoc argmax, the validation split, the last epoch and the oracle (best test
epoch).

Datasets: MNIST-1D (``mnist1d.data.make_dataset``, generated locally, 4000 train / 1000 test)
and scikit-learn's bundled ``load_digits`` (8x8 digits, 1257 train / 540 test). Symmetric label
noise on the training set only (each corrupted label replaced by a different class, uniformly);
test labels are clean. Architectures: an MLP whose head input is a ReLU output (``mlp``), and the
same with a LayerNorm before the head (``mlp_ln``); for MNIST-1D also the 1-D CNN of
``examples/mnist1d_gwa.py`` (``cnn``) and the same with a LayerNorm before the head
(``cnn_ln``), run with ``--datasets mnist1d --archs cnn cnn_ln --epochs 40``.

Run: ``python benchmarks/early_stopping.py --workers 2`` (each worker: one process, one torch
thread); ``--quick`` runs one seed of one dataset at 20% noise with a short run (smoke test).
Raw per-epoch curves go to ``--out`` (JSON); the tables go to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lightning_gradwatch.functional.stopping import select_epoch, should_stop

NUM_CLASSES = 10
VAL_PATIENCE = 10
DATASETS = ("mnist1d", "digits")
ARCHS = ("mlp", "mlp_ln", "cnn", "cnn_ln")
#: Fixed run lengths, long enough that the noisy labels get memorised (test accuracy falls).
EPOCHS = {"mnist1d": 60, "digits": 60}
BATCH_SIZE = {"mnist1d": 128, "digits": 64}

#: The rule chosen as ``GWAEarlyStopping``'s default from this study.
DEFAULT_LABEL = "max_after_first_min, patience 10 (default)"
VAL_LABEL = "10% val. split: EarlyStopping + ModelCheckpoint(val/loss)"
#: The rows of the per-configuration tables in benchmarks/README.md.
README_LABELS = [
    "paper: argmax over the run (post hoc)",
    "paper: max after first min (post hoc)",
    "argmax, patience 5 (old default)",
    "max_after_first_min, patience 5",
    DEFAULT_LABEL,
    VAL_LABEL,
    "last epoch",
    "oracle (best test epoch)",
]

#: Candidate online stoppers: (label, rule, options, patience).
CANDIDATES: list[tuple[str, str, dict[str, Any], int]] = [
    ("argmax, patience 5 (old default)", "argmax", {}, 5),
    ("argmax, patience 10", "argmax", {}, 10),
    ("argmax, warmup 1, patience 5", "argmax", {"warmup": 1}, 5),
    ("argmax, warmup 1, patience 10", "argmax", {"warmup": 1}, 10),
    ("argmax, warmup 3, patience 10", "argmax", {"warmup": 3}, 10),
    ("argmax, warmup 5, patience 10", "argmax", {"warmup": 5}, 10),
    ("argmax, smoothing 0.5, patience 10", "argmax", {"smoothing": 0.5}, 10),
    ("argmax, warmup 1, smoothing 0.5, patience 10", "argmax", {"warmup": 1, "smoothing": 0.5}, 10),
    ("argmax, warmup 1, smoothing 0.7, patience 15", "argmax", {"warmup": 1, "smoothing": 0.7}, 15),
    (
        "argmax, warmup 1, min_rel_delta 0.01, patience 10",
        "argmax",
        {"warmup": 1, "min_rel_delta": 0.01},
        10,
    ),
    (
        "argmax, warmup 1, min_rel_delta 0.05, patience 10",
        "argmax",
        {"warmup": 1, "min_rel_delta": 0.05},
        10,
    ),
    ("max_after_first_min, patience 5", "max_after_first_min", {}, 5),
    (DEFAULT_LABEL, "max_after_first_min", {}, 10),
    (
        "max_after_first_min, smoothing 0.5, patience 10",
        "max_after_first_min",
        {"smoothing": 0.5},
        10,
    ),
    ("mean_after_kurtosis_settles, patience 5", "mean_after_kurtosis_settles", {}, 5),
    ("mean_after_kurtosis_settles, patience 10", "mean_after_kurtosis_settles", {}, 10),
    ("gwa_after_kurtosis_settles, patience 5", "gwa_after_kurtosis_settles", {}, 5),
    ("gwa_after_kurtosis_settles, patience 10", "gwa_after_kurtosis_settles", {}, 10),
]


@dataclass
class Split:
    x: Any  # (N, D) float32 tensor
    y_noisy: Any  # (N,) int64, labels used for training
    y_clean: Any  # (N,)
    x_test: Any
    y_test: Any  # clean


def load_split(dataset: str, noise: float, seed: int) -> Split:
    """The dataset's clean train/test split with a fraction ``noise`` of the training labels
    flipped to a different uniformly random class (pattern from ``default_rng(seed)``)."""
    import torch

    if dataset == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())
        x, y = data["x"], data["y"]
        x_test, y_test = data["x_test"], data["y_test"]
    elif dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(12345).permutation(len(digits.target))
        n_train = 1257
        x, y = digits.data[order[:n_train]], digits.target[order[:n_train]]
        x_test, y_test = digits.data[order[n_train:]], digits.target[order[n_train:]]
    else:
        raise ValueError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    mean, std = x.mean(0), x.std(0) + 1e-6  # standardise with training statistics
    x, x_test = (x - mean) / std, (x_test - mean) / std
    y = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    flip = rng.permutation(len(y))[: round(noise * len(y))]
    y_noisy = y.copy()
    y_noisy[flip] = (y[flip] + rng.integers(1, NUM_CLASSES, len(flip))) % NUM_CLASSES
    as_x = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(np.asarray(a), dtype=torch.int64)  # noqa: E731
    return Split(as_x(x), as_y(y_noisy), as_y(y), as_x(x_test), as_y(y_test))


def _make_module(in_features: int, arch: str, lr: float = 1e-3):  # -> pl.LightningModule
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn

    class MLP(pl.LightningModule):
        """Two hidden ReLU layers and the linear head GWA scores; ``mlp_ln`` normalises the
        head input with a LayerNorm, as the paper's architectures do."""

        def __init__(self) -> None:
            super().__init__()
            width = 256
            layers: list[nn.Module] = [
                nn.Linear(in_features, width),
                nn.ReLU(),
                nn.Linear(width, width),
                nn.ReLU(),
            ]
            if arch == "mlp_ln":
                layers.append(nn.LayerNorm(width))
            if arch in ("cnn", "cnn_ln"):
                # The 1-D CNN of examples/mnist1d_gwa.py over the signal as one channel.
                channels = 32
                layers = [
                    nn.Unflatten(1, (1, in_features)),
                    nn.Conv1d(1, channels, 5, padding=2),
                    nn.ReLU(),
                    nn.Conv1d(channels, channels, 3, stride=2, padding=1),
                    nn.ReLU(),
                    nn.Conv1d(channels, channels, 3, stride=2, padding=1),
                    nn.ReLU(),
                    nn.Flatten(),
                    nn.Linear(channels * ((in_features + 3) // 4), 128),
                    nn.ReLU(),
                ]
                width = 128
                if arch == "cnn_ln":
                    layers.append(nn.LayerNorm(width))
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(width, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

        def training_step(self, batch, batch_idx: int) -> torch.Tensor:
            x, y = batch[0], batch[1]  # IndexedDataset appends the index as batch[2]
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx: int) -> None:
            x, y = batch
            self.log("val/loss", F.cross_entropy(self(x), y), prog_bar=False)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=lr)

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHS)}")
    return MLP()


def _test_accuracy(module, split: Split) -> float:
    import torch

    was_training = module.training
    module.eval()
    with torch.no_grad():
        accuracy = float((module(split.x_test).argmax(-1) == split.y_test).float().mean())
    module.train(was_training)
    return accuracy


def run_config(
    job: tuple[str, str, float, int, int], root_dir: str | None = None
) -> dict[str, Any]:
    """Both Lightning runs of one ``(dataset, arch, noise, seed, epochs)`` configuration; the
    checkpoints go under ``root_dir`` (default: a temporary directory, removed afterwards)."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_gradwatch import GradientWeightAlignment, IndexedDataset

    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    dataset, arch, noise, seed, epochs = job
    start = time.perf_counter()
    split = load_split(dataset, noise, seed)
    batch_size = BATCH_SIZE[dataset]

    class TestAccuracy(Callback):
        """Clean test accuracy after every training epoch, in eval mode without gradients (no
        RNG, no parameter is touched, so training is unchanged)."""

        def __init__(self) -> None:
            self.curve: list[float] = []

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.curve.append(_test_accuracy(pl_module, split))

    def trainer(callbacks: list[Callback], root: str, checkpointing: bool) -> pl.Trainer:
        return pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=checkpointing,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
            default_root_dir=root,
        )

    with tempfile.TemporaryDirectory(dir=root_dir) as root:
        # 1. Fixed-length run on all training data with GWA.
        pl.seed_everything(seed, workers=True, verbose=False)
        gwa = GradientWeightAlignment(indices=-1)
        test_acc = TestAccuracy()
        loader = DataLoader(
            IndexedDataset(TensorDataset(split.x, split.y_noisy)),
            batch_size=batch_size,
            shuffle=True,
        )
        trainer([gwa, test_acc], root, checkpointing=False).fit(
            _make_module(split.x.shape[1], arch), loader
        )
        corrupted = (split.y_noisy != split.y_clean).numpy()
        scores = gwa.score_history().numpy()  # (epochs, N) epoch-mean score per sample
        auroc = (
            [float(roc_auc_score(corrupted, -epoch_scores)) for epoch_scores in scores]
            if corrupted.any()
            else []
        )

        # 2. The usual user set-up: 10% noisy validation split, EarlyStopping + checkpoint.
        order = torch.from_numpy(np.random.default_rng(seed + 1000).permutation(len(split.x)))
        n_val = len(order) // 10
        val_idx, train_idx = order[:n_val], order[n_val:]
        pl.seed_everything(seed, workers=True, verbose=False)
        checkpoint = ModelCheckpoint(
            dirpath=os.path.join(root, "ckpt"), monitor="val/loss", mode="min", save_top_k=1
        )
        stopper = EarlyStopping(monitor="val/loss", mode="min", patience=VAL_PATIENCE)
        val_trainer = trainer([checkpoint, stopper], root, checkpointing=True)
        module = _make_module(split.x.shape[1], arch)
        val_trainer.fit(
            module,
            DataLoader(
                TensorDataset(split.x[train_idx], split.y_noisy[train_idx]),
                batch_size=batch_size,
                shuffle=True,
            ),
            DataLoader(TensorDataset(split.x[val_idx], split.y_noisy[val_idx]), batch_size=1024),
        )
        best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
        module.load_state_dict(best["state_dict"])
        val_result = {
            "test_acc": _test_accuracy(module, split),
            "epochs_trained": int(val_trainer.current_epoch),
            "best_epoch": int(best["epoch"]),
        }

    result = {
        "dataset": dataset,
        "arch": arch,
        "noise": noise,
        "seed": seed,
        "epochs": epochs,
        "history": [{k: float(h[k]) for k in ("gwa", "mean", "kurtosis")} for h in gwa.history],
        "test_acc": test_acc.curve,
        "auroc": auroc,
        "val_split": val_result,
        "seconds": time.perf_counter() - start,
    }
    print(
        f"{dataset} {arch} noise {noise:.0%} seed {seed}: last {test_acc.curve[-1]:.3f}, "
        f"best {max(test_acc.curve):.3f}@{int(np.argmax(test_acc.curve))}, "
        f"val split {val_result['test_acc']:.3f} ({val_result['epochs_trained']} ep), "
        f"{result['seconds']:.0f} s",
        flush=True,
    )
    return result


def compact(result: dict[str, Any]) -> dict[str, Any]:
    """The result with its curves rounded (6 significant digits for the GWA history, 4 decimals
    for accuracies and AUROCs) to keep the saved JSON small; NaN becomes null."""

    def rounded(value: float, fmt: str) -> float | None:
        return float(format(value, fmt)) if np.isfinite(value) else None

    return {
        **result,
        "history": [{k: rounded(v, ".6g") for k, v in h.items()} for h in result["history"]],
        "test_acc": [rounded(v, ".4f") for v in result["test_acc"]],
        "auroc": [rounded(v, ".4f") for v in result["auroc"]],
        "seconds": round(result["seconds"], 1),
    }


def replay(
    history: list[dict[str, float]], rule: str, options: dict[str, Any], patience: int | None
) -> tuple[int, int]:
    """(selected epoch, epochs trained) of an online stopper with restore-best; ``patience``
    None is the post-hoc rule over the whole run. With nothing selected, the last epoch."""
    last = len(history) - 1
    if patience is not None:
        for t in range(len(history)):
            if should_stop(history[: t + 1], rule, patience, **options):
                return select_epoch(history[: t + 1], rule, **options), t + 1  # type: ignore[return-value]
    selected = select_epoch(history, rule, **options)
    return (last if selected is None else selected), len(history)


def evaluate(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per strategy: clean test accuracy (%), epochs trained, selected epoch, AUROC."""
    history, test_acc, auroc = run["history"], run["test_acc"], run["auroc"]
    last = len(history) - 1

    def row(epoch: int, trained: int) -> dict[str, float]:
        return {
            "acc": 100 * test_acc[epoch],
            "trained": trained,
            "epoch": epoch,
            "auroc": auroc[epoch] if auroc else float("nan"),
        }

    rows = {
        "paper: argmax over the run (post hoc)": row(*replay(history, "argmax", {}, None)),
        "paper: max after first min (post hoc)": row(
            *replay(history, "max_after_first_min", {}, None)
        ),
    }
    for label, rule, options, patience in CANDIDATES:
        rows[label] = row(*replay(history, rule, options, patience))
    val = run["val_split"]
    rows[VAL_LABEL] = {
        "acc": 100 * val["test_acc"],
        "trained": val["epochs_trained"],
        "epoch": val["best_epoch"],
        "auroc": float("nan"),
    }
    rows["last epoch"] = row(last, len(history))
    rows["oracle (best test epoch)"] = row(int(np.argmax(test_acc)), len(history))
    return rows


def _fmt(values: np.ndarray, digits: int = 1) -> str:
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.{digits}f} ± {std:.{digits}f}"


def tables(results: list[dict[str, Any]], labels: list[str] | None = None) -> str:
    """One markdown table per dataset x architecture, rows strategy (all, or ``labels``) x
    noise."""
    out = []
    evaluated = [(r, evaluate(r)) for r in results]
    groups = sorted({(r["dataset"], r["arch"]) for r in results})
    for dataset, arch in groups:
        out += [
            f"\n**{dataset}, {arch}** ({len({r['seed'] for r in results})} seeds, mean ± std)\n",
            "| strategy | noise | clean test acc. (%) | minus val. split (points) | epochs trained "
            "| selected epoch | # epoch 0 | AUROC at selected |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label in labels or list(evaluated[0][1]):
            for noise in sorted({r["noise"] for r in results}):
                group = [
                    rows
                    for r, rows in evaluated
                    if (r["dataset"], r["arch"], r["noise"]) == (dataset, arch, noise)
                ]
                acc, trained, epoch, auroc = (
                    np.array([g[label][key] for g in group])
                    for key in ("acc", "trained", "epoch", "auroc")
                )
                gap = acc - np.array([g[VAL_LABEL]["acc"] for g in group])
                out.append(
                    f"| {label} | {noise:.0%} | {_fmt(acc)} | {_fmt(gap)} | "
                    f"{_fmt(trained)} | {_fmt(epoch)} | "
                    f"{int((epoch == 0).sum())}/{len(group)} | "
                    + (f"{_fmt(auroc, 3)} |" if np.isfinite(auroc).all() else "n/a |")
                )
    return "\n".join(out)


def summary(results: list[dict[str, Any]]) -> str:
    """One row per strategy over all runs: the mean gap to the validation split at each noise
    level (averaged over the dataset x architecture groups), the worst group mean, how often
    epoch 0 was selected, the mean epochs trained and the mean AUROC at the selected epoch."""
    evaluated = [(r, evaluate(r)) for r in results]
    noises = sorted({r["noise"] for r in results})
    groups = sorted({(r["dataset"], r["arch"]) for r in results})
    noisy = [n for n in noises if n > 0]
    out = [
        "| strategy | "
        + " | ".join(f"gap {n:.0%}" for n in noises)
        + " | worst group (gap, where) | # epoch 0 | epochs trained | "
        + " | ".join(f"AUROC {n:.0%}" for n in noisy)
        + " |",
        "|---|" + "---|" * (len(noises) + 3 + len(noisy)),
    ]
    for label in evaluated[0][1]:
        cells, worst = [], (np.inf, "")
        for noise in noises:
            group_means = []
            for group in groups:
                gaps = [
                    rows[label]["acc"] - rows[VAL_LABEL]["acc"]
                    for r, rows in evaluated
                    if (r["dataset"], r["arch"], r["noise"]) == (*group, noise)
                ]
                group_means.append(float(np.mean(gaps)))
                if group_means[-1] < worst[0]:
                    worst = (group_means[-1], f"{group[0]} {group[1]} {noise:.0%}")
            cells.append(f"{np.mean(group_means):+.2f}")
        all_rows = [rows[label] for _, rows in evaluated]
        aurocs = [
            np.mean([rows[label]["auroc"] for r, rows in evaluated if r["noise"] == n])
            for n in noisy
        ]
        out.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {worst[0]:+.2f} ({worst[1]}) | "
            + f"{sum(row['epoch'] == 0 for row in all_rows)}/{len(all_rows)} | "
            + f"{np.mean([row['trained'] for row in all_rows]):.1f} | "
            + " | ".join("n/a" if np.isnan(a) else f"{a:.3f}" for a in aurocs)
            + " |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--epochs", type=int, default=None, help="override the run length")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 seed, digits, mlp, 20%%, 8 epochs")
    parser.add_argument("--out", default="benchmarks/early_stopping_results.json")
    parser.add_argument(
        "--tabulate",
        metavar="JSON",
        help="print the tables of saved results (e.g. the --out of an earlier run) and exit",
    )
    parser.add_argument(
        "--root-dir",
        default=None,
        help="where the validation-split checkpoints go (a temporary directory under it, removed "
        "after each run; default: the system's temporary directory)",
    )
    args = parser.parse_args(argv)
    if args.tabulate:
        with open(args.tabulate) as handle:
            saved = json.load(handle)
        print(summary(saved), tables(saved, README_LABELS), tables(saved), sep="\n")
        return
    if args.quick:
        args.datasets, args.archs, args.seeds, args.noise = ["digits"], ["mlp"], [0], [0.2]
        args.epochs = args.epochs or 8
    jobs = [
        (d, a, n, s, args.epochs or EPOCHS[d])
        for d in args.datasets
        for a in args.archs
        for n in args.noise
        for s in args.seeds
    ]
    start = time.perf_counter()
    if args.workers > 1:
        with ProcessPoolExecutor(min(args.workers, 2)) as pool:
            results = list(pool.map(run_config, jobs, [args.root_dir] * len(jobs)))
    else:
        results = [run_config(job, args.root_dir) for job in jobs]
    with open(args.out, "w") as handle:
        json.dump([compact(r) for r in results], handle, separators=(",", ":"))
    print(
        f"\n{len(jobs)} configurations, machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}; {time.perf_counter() - start:.0f} s"
    )
    print(summary(results), tables(results), sep="\n")


if __name__ == "__main__":
    main()
