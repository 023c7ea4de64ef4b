"""Long-run cost of the README's callbacks: does a step get slower, or memory grow, over time?

A small MLP on synthetic 40-feature, 10-class data (``IndexedDataset``) is trained for
``--steps`` optimizer steps with the README's quick-start callbacks (``GradientWeightAlignment
(indices=-1)``, ``GWAEarlyStopping``, ``GradientSNR``, ``SpectralNorms``) at their default
settings (the stopper's patience aside, so that it never ends the run) and a
``TensorBoardLogger`` under a temporary directory. A timing callback records, per window of
``--window`` steps, the mean wall time per step, the process's resident memory (RSS) and the
number of live tensors that the garbage collector tracks. The table answers two
questions: does the per-step cost grow with the step count, and is memory flat?

``--gsnr-every-step`` runs ``GradientSNR`` on every step and ``--log-every-step`` sets the
Trainer's ``log_every_n_steps=1`` (the setting of the report that a 3,000-step run did not
finish in 8 minutes). ``--no-heatmap`` turns off ``SpectralNorms``' epoch-end heatmap images.
``--no-callbacks`` runs the same loop bare, as a baseline.

Usage::

    python benchmarks/long_run.py                      # 5,000 steps, default settings
    python benchmarks/long_run.py --gsnr-every-step --log-every-step
    python benchmarks/long_run.py --steps 300 --window 50   # quick mode
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

if __package__ in (None, ""):  # `python benchmarks/long_run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_gradwatch import (
    GradientSNR,
    GradientWeightAlignment,
    GWAEarlyStopping,
    IndexedDataset,
    SpectralNorms,
)

NUM_FEATURES = 40
NUM_CLASSES = 10


class LongRunModule(pl.LightningModule):
    """MLP ``40 -> 128 -> 128 -> 10`` (ReLU), mean cross-entropy, SGD with momentum."""

    def __init__(self, hidden: int = 128, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(NUM_FEATURES, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )
        self.lr = lr

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def make_loader(num_samples: int, batch_size: int, seed: int) -> DataLoader:
    """Synthetic classification data: labels from a fixed random linear teacher plus 20% label
    noise, so GWA has misaligned samples to find. ``(x, y, index)`` batches."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, NUM_FEATURES, generator=generator)
    teacher = torch.randn(NUM_FEATURES, NUM_CLASSES, generator=generator)
    y = (x @ teacher).argmax(1)
    flip = torch.rand(num_samples, generator=generator) < 0.2
    y[flip] = torch.randint(0, NUM_CLASSES, (int(flip.sum()),), generator=generator)
    return DataLoader(
        IndexedDataset(TensorDataset(x, y)),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


def rss_mib() -> float:
    """Current resident set size of this process in MiB (``/proc/self/status``), falling back to
    the peak (``resource.getrusage``) where ``/proc`` is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kib / (1024 * 1024) if sys.platform == "darwin" else peak_kib / 1024


def live_tensors() -> int:
    """Tensors (and parameters) currently tracked by the garbage collector."""
    count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns on some deprecated objects' isinstance
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    count += 1
            except Exception:  # objects whose __class__ lookup fails (lazy modules, proxies)
                continue
    return count


@dataclass
class Window:
    """One row of the table: steps ``[first_step, last_step]``."""

    first_step: int
    last_step: int
    ms_per_step: float
    cpu_ms_per_step: float
    rss_mib: float
    live_tensors: int


@dataclass
class WindowTimer(Callback):
    """Records the mean wall and CPU time (this process, all threads) per optimizer step over
    each window of ``window`` steps, and RSS and live tensors at the window's end. On a shared
    machine the CPU time is the steadier of the two. The memory reads (a full ``gc`` scan) happen
    outside the timed interval: the clock restarts after them."""

    window: int
    rows: list[Window] = field(default_factory=list)
    _start: float = 0.0
    _start_cpu: float = 0.0
    _first: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first = trainer.global_step
        self._start, self._start_cpu = time.perf_counter(), time.process_time()

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step  # already incremented: `step` steps are done
        if step - self._first < self.window:
            return
        elapsed = time.perf_counter() - self._start
        elapsed_cpu = time.process_time() - self._start_cpu
        gc.collect()
        self.rows.append(
            Window(
                first_step=self._first,
                last_step=step - 1,
                ms_per_step=1000 * elapsed / (step - self._first),
                cpu_ms_per_step=1000 * elapsed_cpu / (step - self._first),
                rss_mib=rss_mib(),
                live_tensors=live_tensors(),
            )
        )
        self._first = step
        self._start, self._start_cpu = time.perf_counter(), time.process_time()


def build_callbacks(gsnr_every_step: bool, heatmap: bool = True) -> list[Callback]:
    """The README's quick-start callbacks at their default settings, except the stopper's
    patience (and ``SpectralNorms(heatmap=False)`` where asked)."""
    gsnr = GradientSNR(every_n_steps=1) if gsnr_every_step else GradientSNR()
    return [
        GradientWeightAlignment(indices=-1),
        # The quick start's patience=5 would end the run after a few dozen epochs; a patience
        # beyond the run keeps the stopper deciding every epoch (the same work) to the end.
        GWAEarlyStopping(patience=10**6),
        gsnr,
        SpectralNorms(heatmap=heatmap),
    ]


def run(
    steps: int,
    window: int,
    gsnr_every_step: bool = False,
    log_every_step: bool = False,
    callbacks: bool = True,
    heatmap: bool = True,
    num_samples: int = 2048,
    batch_size: int = 64,
    root_dir: str | None = None,
    seed: int = 0,
) -> list[Window]:
    """Train for ``steps`` optimizer steps and return the per-window rows (a run that stops
    early is reported on stderr and has fewer rows)."""
    pl.seed_everything(seed, verbose=False)
    timer = WindowTimer(window=window)
    extra = build_callbacks(gsnr_every_step, heatmap) if callbacks else []
    with tempfile.TemporaryDirectory(dir=root_dir) as tmp:
        trainer = pl.Trainer(
            max_steps=steps,
            max_epochs=-1,
            default_root_dir=tmp,
            logger=TensorBoardLogger(tmp, name="long_run"),
            callbacks=[timer, *extra],
            log_every_n_steps=1 if log_every_step else 50,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(LongRunModule(), make_loader(num_samples, batch_size, seed))
        if trainer.global_step < steps:
            print(
                f"note: the run stopped at step {trainer.global_step} of {steps} "
                f"(GWAEarlyStopping at epoch {trainer.current_epoch})",
                file=sys.stderr,
            )
    return timer.rows


def _growth(values: list[float]) -> float:
    """Ratio of the last quarter's mean to the first quarter's mean (first window excluded:
    it holds the warm-up)."""
    body = values[1:] if len(values) > 2 else values
    quarter = max(1, len(body) // 4)
    first, last = body[:quarter], body[-quarter:]
    return (sum(last) / len(last)) / (sum(first) / len(first))


def format_table(rows: list[Window]) -> str:
    """Markdown table of the windows plus a summary line of the growth ratios."""
    lines = [
        "| steps | wall ms/step | CPU ms/step | RSS MiB | live tensors |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.first_step}-{r.last_step} | {r.ms_per_step:.2f} | {r.cpu_ms_per_step:.2f} "
            f"| {r.rss_mib:.1f} "
            f"| {r.live_tensors} |"
        )
    if len(rows) >= 2:
        lines.append("")
        lines.append(
            f"last/first quarter (first window excluded): wall time x"
            f"{_growth([r.ms_per_step for r in rows]):.3f}, CPU time x"
            f"{_growth([r.cpu_ms_per_step for r in rows]):.3f}, RSS x"
            f"{_growth([r.rss_mib for r in rows]):.3f}, live tensors "
            f"{rows[1 if len(rows) > 2 else 0].live_tensors} -> {rows[-1].live_tensors}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--window", type=int, default=250, help="steps per table row")
    parser.add_argument("--gsnr-every-step", action="store_true")
    parser.add_argument("--log-every-step", action="store_true")
    parser.add_argument("--no-callbacks", action="store_true", help="bare loop (baseline)")
    parser.add_argument(
        "--no-heatmap", action="store_true", help="SpectralNorms(heatmap=False): no epoch images"
    )
    parser.add_argument("--samples", type=int, default=2048, help="dataset size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    started = time.perf_counter()
    load_before = os.getloadavg()
    rows = run(
        args.steps,
        args.window,
        gsnr_every_step=args.gsnr_every_step,
        log_every_step=args.log_every_step,
        callbacks=not args.no_callbacks,
        heatmap=not args.no_heatmap,
        num_samples=args.samples,
        batch_size=args.batch_size,
    )
    load_after = os.getloadavg()
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: python benchmarks/long_run.py {shown}")
    print(
        f"threads {args.threads}, {os.cpu_count()} CPUs, load average (1 min) "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
