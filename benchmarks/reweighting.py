"""Does reweighting samples by their GWA score help under label noise? ``GWAReweighting`` study.

Small MLPs on MNIST-1D (``mnist1d.data.make_dataset``, generated locally) and scikit-learn's
``load_digits``, with symmetric label noise (each corrupted label replaced by a different class,
uniformly) and an asymmetric class flip (``y -> (y + 1) mod 10``). Every run trains a fixed
number of epochs with Adam and records the clean test accuracy after every epoch. Methods:

- ``none``: no reweighting (``GradientWeightAlignment`` attached, which does not change
  training; its per-epoch scores give the warm-up/EMA study below);
- ``clip``, ``sigmoid``, ``rank``, ``mixture``: ``GWAReweighting(rule=...)`` with its defaults;
- ``loss-mixture``: the loss-based baseline, the same two-component mixture rule, warm-up and
  mean-1 normalisation, on the negated per-sample training loss of the previous epoch (the
  high-loss component is down-weighted, as loss-based methods such as DivideMix do);
- ``loss-rank``: down-weights the ``fraction`` highest-loss samples of the dataset (the loss
  counterpart of ``rank``).

Printed (and written to ``--out`` as JSON): final and best clean test accuracy, mean ± std over
seeds, per dataset and noise setting; and, from the ``none`` runs, the AUROC of ``-score`` for
flagging corrupted labels per epoch, for the raw epoch scores and their EMA (the evidence for
the warm-up and EMA defaults).

Run: ``python benchmarks/reweighting.py --seeds 0 1 2 3 4 --workers 2`` (one torch thread per
worker process); ``--quick`` is a smoke run of a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

NUM_CLASSES = 10
GWA_RULES = ("clip", "sigmoid", "rank", "mixture")
#: "clip+stop": the default rule with ``GWAEarlyStopping()`` (default rule, restored weights);
#: its "final" accuracy is the model's after ``fit``, as the user gets it.
METHODS = ("none", *GWA_RULES, "loss-mixture", "loss-rank", "clip+stop")
#: noise setting -> (fraction of training labels corrupted, symmetric?)
NOISES = {"sym0": (0.0, True), "sym20": (0.2, True), "sym40": (0.4, True), "asym40": (0.4, False)}


@dataclass
class Job:
    dataset: str
    noise: str
    seed: int
    method: str
    epochs: int
    warmup: int
    ema: float
    train_limit: int | None = None


def load(dataset: str, noise: str, seed: int, train_limit: int | None = None) -> dict[str, Any]:
    """Features ``(N, D)`` float32, noisy and clean training labels, clean test set."""
    import torch

    if dataset == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())
        x, y = data["x"], data["y"]
        x_test, y_test = data["x_test"], data["y_test"]
    elif dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.target))
        cut = len(order) * 3 // 4
        x, y = digits.data[order[:cut]], digits.target[order[:cut]]
        x_test, y_test = digits.data[order[cut:]], digits.target[order[cut:]]
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    if train_limit is not None:
        x, y = x[:train_limit], y[:train_limit]
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mean) / std, (x_test - mean) / std
    y_clean = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    rate, symmetric = NOISES[noise]
    flip = rng.permutation(len(y_clean))[: round(rate * len(y_clean))]
    y_noisy = y_clean.copy()
    if symmetric:
        y_noisy[flip] = (y_clean[flip] + rng.integers(1, NUM_CLASSES, len(flip))) % NUM_CLASSES
    else:
        y_noisy[flip] = (y_clean[flip] + 1) % NUM_CLASSES
    as_float = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    return {
        "x": as_float(x),
        "y": torch.tensor(y_noisy),
        "corrupted": y_noisy != y_clean,
        "x_test": as_float(x_test),
        "y_test": torch.tensor(np.asarray(y_test, dtype=np.int64)),
    }


def run(job: Job) -> dict[str, Any]:
    """One training run; returns the per-epoch clean test accuracy (and scores for ``none``)."""
    import logging
    import warnings

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import Callback
    from torch import Tensor, nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_gradwatch import (
        GradientWeightAlignment,
        GWAEarlyStopping,
        GWAReweighting,
        IndexedDataset,
    )
    from lightning_gradwatch.callbacks.gwa_reweighting import raw_weights

    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    data = load(job.dataset, job.noise, job.seed, job.train_limit)

    class MLP(pl.LightningModule):
        def __init__(self, inputs: int, loss_rule: str | None) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Linear(inputs, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU()
            )
            self.head = nn.Linear(128, NUM_CLASSES)
            self.loss_rule = loss_rule
            self.last_loss = torch.full((len(data["x"]),), float("nan"), dtype=torch.float64)
            self.loss_weights: Tensor | None = None

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.body(x))

        def on_train_epoch_start(self) -> None:
            if self.loss_rule is None or self.current_epoch < job.warmup:
                return
            self.loss_weights = raw_weights(-self.last_loss, self.loss_rule).float()

        def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
            x, y, index = batch
            losses = F.cross_entropy(self(x), y, reduction="none")
            if self.loss_rule is None:
                return losses.mean()
            self.last_loss[index] = losses.detach().double()
            if self.loss_weights is None:
                return losses.mean()
            raw = self.loss_weights[index]
            total = raw.sum()
            weights = torch.where(total > 0, raw * len(raw) / total, torch.ones_like(raw))
            return (weights * losses).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class TestAccuracy(Callback):
        def __init__(self) -> None:
            self.history: list[float] = []

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            pl_module.eval()
            with torch.no_grad():
                predicted = pl_module(data["x_test"]).argmax(-1)
            self.history.append(float((predicted == data["y_test"]).float().mean()))
            pl_module.train()

    loss_rule = {"loss-mixture": "mixture", "loss-rank": "rank"}.get(job.method)
    pl.seed_everything(job.seed, workers=True, verbose=False)
    model = MLP(data["x"].shape[1], loss_rule)
    accuracy = TestAccuracy()
    gwa = GradientWeightAlignment(indices=-1)
    callbacks: list[Callback] = [gwa, accuracy]
    if job.method in GWA_RULES:
        callbacks.append(GWAReweighting(rule=job.method, warmup_epochs=job.warmup, ema=job.ema))
    stopper = None
    if job.method == "clip+stop":
        stopper = GWAEarlyStopping()
        callbacks += [GWAReweighting(rule="clip", warmup_epochs=job.warmup, ema=job.ema), stopper]
    trainer = pl.Trainer(
        max_epochs=job.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    loader = DataLoader(
        IndexedDataset(TensorDataset(data["x"], data["y"])), batch_size=128, shuffle=True
    )
    trainer.fit(model, loader)
    result: dict[str, Any] = {**job.__dict__, "test": accuracy.history}
    if stopper is not None:
        # What the user gets: the restored weights of the selected epoch.
        model.eval()
        with torch.no_grad():
            predicted = model(data["x_test"]).argmax(-1)
        result["after_fit"] = float((predicted == data["y_test"]).float().mean())
        result["epochs_trained"] = len(accuracy.history)
        result["selected_epoch"] = stopper.best_epoch
    if job.method == "none":
        result["auroc"] = _auroc_by_epoch(gwa.score_history().numpy(), data["corrupted"])
    result["seconds"] = time.perf_counter() - start
    print(
        f"{job.dataset} {job.noise} seed {job.seed} {job.method}: final "
        f"{result.get('after_fit', accuracy.history[-1]):.3f} best {max(accuracy.history):.3f} "
        f"({result['seconds']:.0f} s)",
        flush=True,
    )
    return result


def _auroc_by_epoch(history: np.ndarray, corrupted: np.ndarray) -> dict[str, list[float]]:
    """AUROC of ``-score`` for the corrupted labels, per epoch, raw and EMA-smoothed."""
    from sklearn.metrics import roc_auc_score

    if not 0 < corrupted.mean() < 1:
        return {}
    out: dict[str, list[float]] = {"raw": [], "ema0.5": [], "ema0.3": []}
    smooth = {"ema0.5": None, "ema0.3": None}
    for row in history:
        row = np.nan_to_num(row[: len(corrupted)], nan=0.0)
        out["raw"].append(float(roc_auc_score(corrupted, -row)))
        for key, alpha in (("ema0.5", 0.5), ("ema0.3", 0.3)):
            previous = smooth[key]
            smooth[key] = row if previous is None else alpha * row + (1 - alpha) * previous
            out[key].append(float(roc_auc_score(corrupted, -smooth[key])))
    return out


def _mean_std(values: list[float]) -> str:
    array = np.array(values) * 100
    spread = array.std(ddof=1) if len(array) > 1 else 0.0
    return f"{array.mean():.2f} ± {spread:.2f}"


def tables(results: list[dict[str, Any]]) -> str:
    lines = [
        "| dataset | noise | method | seeds | final clean test acc. (%) | best clean test acc. "
        "(%) | final - none (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted(
        {(r["dataset"], r["noise"]) for r in results},
        key=lambda k: (k[0], list(NOISES).index(k[1])),
    )
    for dataset, noise in keys:
        group = [r for r in results if (r["dataset"], r["noise"]) == (dataset, noise)]
        base = {r["seed"]: r["test"][-1] for r in group if r["method"] == "none"}
        for method in METHODS:
            runs = [r for r in group if r["method"] == method]
            if not runs:
                continue
            final = [r.get("after_fit", r["test"][-1]) for r in runs]
            best = [max(r["test"]) for r in runs]
            paired = [
                r.get("after_fit", r["test"][-1]) - base[r["seed"]]
                for r in runs
                if r["seed"] in base
            ]
            lines.append(
                f"| {dataset} | {noise} | {method} | {len(runs)} | {_mean_std(final)} | "
                f"{_mean_std(best)} | {_mean_std(paired) if paired else 'n/a'} |"
            )
    lines += [
        "",
        "AUROC of -score for the corrupted labels by epoch (mean over seeds, `none` runs):",
        "",
    ]
    for dataset, noise in keys:
        runs = [r for r in results if (r["dataset"], r["noise"]) == (dataset, noise)]
        runs = [r for r in runs if r["method"] == "none" and r.get("auroc")]
        if not runs:
            continue
        for kind in ("raw", "ema0.5", "ema0.3"):
            curve = np.mean([r["auroc"][kind] for r in runs], axis=0)
            shown = ", ".join(f"{e}: {v:.3f}" for e, v in enumerate(curve[:8]))
            tail = f", last: {curve[-1]:.3f}" if len(curve) > 8 else ""
            lines.append(f"- {dataset} {noise} {kind}: {shown}{tail}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"])
    parser.add_argument("--noise", nargs="+", default=list(NOISES), choices=NOISES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ema", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/reweighting_results.json")
    parser.add_argument("--append", action="store_true", help="add to the runs in --out")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = parser.parse_args()
    limit = None
    if args.quick:
        args.datasets, args.noise, args.seeds = ["digits"], ["sym40"], [0]
        args.methods, args.epochs, args.warmup, limit = (
            ["none", "mixture", "loss-mixture"],
            3,
            1,
            256,
        )
    jobs = [
        Job(d, n, s, m, args.epochs, args.warmup, args.ema, limit)
        for d in args.datasets
        for n in args.noise
        for s in args.seeds
        for m in args.methods
    ]
    start = time.perf_counter()
    previous: list[dict[str, Any]] = []
    if args.append and os.path.exists(args.out):
        with open(args.out) as handle:
            previous = json.load(handle)
    results: list[dict[str, Any]] = []
    # Each finished run is saved at once, so an interrupted sweep keeps what it has.
    with ProcessPoolExecutor(max(args.workers, 1)) as pool:
        for future in as_completed([pool.submit(run, job) for job in jobs]):
            results.append(future.result())
            if not args.quick:
                with open(args.out, "w") as handle:
                    json.dump(previous + results, handle)
    results = previous + results
    print(
        f"\n{len(jobs)} runs, {args.epochs} epochs, warm-up {args.warmup}, ema {args.ema}; "
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}; "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print(tables(results))


if __name__ == "__main__":
    main()
