"""Overhead of per-sample gradient statistics on a training step.

Two parts, each timed in one process with the configurations interleaved (every repetition runs
every configuration once, in a rotating order, so slow drifts in machine load hit all of them):

* ``probe``: a plain PyTorch step (forward, backward, SGD step) against the same step with
  :class:`~lightning_gradwatch.GradientProbe` (dot+norm, and dot+norm+sum_sq), against
  ``torch.func`` ``vmap(grad)`` per-sample gradients and, when ``backpack`` is importable,
  BackPACK ``BatchGrad``, both computing the same statistics from materialised per-sample
  gradients. Peak memory per configuration is measured in a fresh subprocess each.
* ``callbacks``: every :class:`~benchmarks.harness.CallbackCase` in ``benchmarks/cases/*.py``
  against the plain Lightning step on the same model and ``Trainer`` settings (per step, or
  per whole epoch for ``per_epoch`` cases such as the README's quick-start set).
* ``scaling`` (its own run): the probe part's ratios along batch size, width and sequence
  length.

Usage::

    python benchmarks/overhead.py [--part probe|callbacks|scaling|all]
                                  [--models mlp,cnn,transformer] [--repeats N] [--quick]
                                  [--threads N] [--clock wall|cpu]
                                  [--no-memory] [--rss-allocator live|default]
                                  [--no-backpack] [--cb-steps N]
                                  [--device cpu|cuda] [--breakdown] [--cases a,b]

See ``benchmarks/README.md`` for how to read the tables and the measured numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import importlib
import json
import math
import os
import pkgutil
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: make `benchmarks` and the package importable
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from benchmarks.harness import MODEL_KEYS, CallbackCase  # noqa: E402
from benchmarks.models import ALL_MODEL_KEYS, BenchModule, fixed_batch_loader, make_model  # noqa: E402
from lightning_gradwatch import GradientProbe  # noqa: E402

#: Targets from the issue for the probe part (ratio to the plain step, 2-core CPU).
PROBE_TARGETS: dict[str, dict[str, float]] = {
    "probe dot+norm": {"mlp": 1.10, "cnn": 1.4, "cnn2d": 1.4, "transformer": 1.4},
    "probe dot+norm+sum_sq": {"mlp": 1.45, "cnn": 1.6, "cnn2d": 1.6, "transformer": 1.6},
}

#: Peak memory of a monitored step, as a ratio to the plain step's (see ``measure_memory``).
MEMORY_TARGET = 1.2

#: The scaling table: (label, model key, make_model keyword, values).
SCALING_AXES: tuple[tuple[str, str, str, tuple[int, ...]], ...] = (
    ("batch size", "mlp", "batch_size", (64, 256, 1024)),
    ("width", "mlp", "width", (256, 512, 1024)),
    ("batch size", "transformer", "batch_size", (8, 32, 128)),
    ("sequence length", "transformer", "seq_len", (16, 64, 256)),
)

Step = Callable[[], None]

#: The clock every timing reads: wall time by default; ``--clock cpu`` switches to this
#: process's CPU time, which other processes on a shared machine disturb far less (use it with
#: ``--threads 1``: with more threads it also counts their spin-waiting).
CLOCK: Callable[[], float] = time.perf_counter

#: A baseline whose warm-up step takes longer than this (s) and 10x the plain step is timed in
#: fewer repetitions.
SLOW_STEP_S = 0.5


# ============================================================================ probe part
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats_from_grad_sample(
    named: dict[str, nn.Parameter], grad_sample: dict[str, Tensor], sum_sq: bool
) -> dict[str, Tensor]:
    """The probe's statistics (dot, squared norm, optionally sum of squares) from per-sample
    gradients ``(B, *param.shape)``, so the baselines produce the same numbers."""
    out: dict[str, Tensor] = {}
    for name, g in grad_sample.items():
        flat = g.flatten(1)
        out[f"{name}.dot"] = flat @ named[name].detach().reshape(-1)
        out[f"{name}.sq_norm"] = flat.pow(2).sum(1)
        if sum_sq:
            out[f"{name}.sum_sq"] = g.pow(2).sum(0)
    return out


def _plain_step(model: nn.Module, x: Tensor, y: Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def make_probe_step(
    model: nn.Module, x: Tensor, y: Tensor, sum_grad_squared: bool
) -> tuple[Step, GradientProbe]:
    """The plain step with a ``GradientProbe`` attached around it (as the callbacks do every
    probed batch), reading the per-sample alignment afterwards."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = GradientProbe(model, sum_grad_squared=sum_grad_squared)

    def step() -> None:
        with probe:
            _plain_step(model, x, y, opt)
        probe.stats.alignment()

    return step, probe


def make_vmap_step(model: nn.Module, x: Tensor, y: Tensor, sum_sq: bool = True) -> Step:
    """Per-sample gradients with ``torch.func.vmap(grad)``, the statistics from them, and the
    SGD step from their mean (so no second forward/backward is spent on the batch gradient)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    named = dict(model.named_parameters())

    def sample_loss(params: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(model, params, (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def step() -> None:
        params = {n: p.detach() for n, p in named.items()}
        grad_sample = per_sample_grad(params, x, y)
        _stats_from_grad_sample(named, grad_sample, sum_sq)
        for name, g in grad_sample.items():
            named[name].grad = g.mean(0)
        opt.step()

    return step


def backpack_available() -> bool:
    try:
        importlib.import_module("backpack")
    except ImportError:
        return False
    return True


def make_backpack_step(model: nn.Module, x: Tensor, y: Tensor, sum_sq: bool = True) -> Step:
    """BackPACK ``BatchGrad`` on a copy of the model (``extend`` adds hooks we keep off the
    other configurations), the statistics from ``grad_batch``, and the SGD step."""
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    bp_model = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(bp_model.parameters(), lr=0.01)
    named = dict(bp_model.named_parameters())
    batch = x.shape[0]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(bp_model(x), y)
        with backpack(BatchGrad()):
            loss.backward()
        # grad_batch holds the per-sample gradients of the mean loss: undo the 1/B.
        grad_sample = {n: p.grad_batch * batch for n, p in named.items()}
        _stats_from_grad_sample(named, grad_sample, sum_sq)
        opt.step()

    return step


BACKPACK_MODELS = ("mlp", "cnn", "cnn2d")  # BackPACK has no MultiheadAttention extension


def probe_configs(key: str, with_backpack: bool) -> list[str]:
    configs = ["plain", "probe dot+norm", "probe dot+norm+sum_sq", "vmap(grad)"]
    if with_backpack and key in BACKPACK_MODELS:
        configs.append("BackPACK BatchGrad")
    return configs


def build_step(
    config: str, model: nn.Module, x: Tensor, y: Tensor
) -> tuple[Step, GradientProbe | None]:
    if config == "plain":
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        return (lambda: _plain_step(model, x, y, opt)), None
    if config == "probe dot+norm":
        return make_probe_step(model, x, y, sum_grad_squared=False)
    if config == "probe dot+norm+sum_sq":
        return make_probe_step(model, x, y, sum_grad_squared=True)
    if config == "vmap(grad)":
        return make_vmap_step(model, x, y), None
    if config == "BackPACK BatchGrad":
        return make_backpack_step(model, x, y), None
    raise ValueError(f"unknown configuration {config!r}")


@dataclass
class ProbeRow:
    model: str
    config: str
    median_ms: float
    ratio: float
    target: float | None
    repeats: int = 0
    peak_mb: float | None = None
    steady_peak_mb: float | None = None
    base_mb: float | None = None
    excluded: dict[str, str] = field(default_factory=dict)
    setting: str = ""


def time_probe_part(
    keys: list[str],
    repeats: int,
    warmup: int,
    device: torch.device,
    with_backpack: bool,
    batch_size: int | None = None,
    only: tuple[str, ...] | None = None,
    **model_kwargs: int,
) -> list[ProbeRow]:
    """Median step time of every configuration on every model, interleaved per repetition.

    ``only`` restricts the configurations (``"plain"`` is always timed); ``model_kwargs`` go to
    ``make_model`` (``width``, ``seq_len``).

    The ratio is the median over repetitions of ``t_config / t_plain`` within the same
    repetition (paired, so load changes between repetitions largely cancel).
    """
    rows: list[ProbeRow] = []
    for key in keys:
        model, x, y = make_model(key, batch_size=batch_size, **model_kwargs)
        model, x, y = model.to(device), x.to(device), y.to(device)
        configs = probe_configs(key, with_backpack)
        if only is not None:
            configs = [c for c in configs if c == "plain" or c in only]
        steps: dict[str, Step] = {}
        probes: dict[str, GradientProbe] = {}
        for config in configs:
            step, probe = build_step(config, model, x, y)
            steps[config] = step
            if probe is not None:
                probes[config] = probe
        warm_time: dict[str, float] = {}
        for config in configs:  # warm-up: allocator, lazy init, the probe's first-use check
            for _ in range(warmup):
                _sync(device)
                start = CLOCK()
                steps[config]()
                _sync(device)
                warm_time[config] = CLOCK() - start
        # Baselines far slower than the step (seconds, and 10x the plain step) get fewer
        # repetitions, still paired with the plain step of the same repetition.
        slow_at = max(SLOW_STEP_S, 10 * warm_time["plain"])
        slow = {c for c, t in warm_time.items() if t > slow_at and not c.startswith("probe")}
        slow_repeats = min(repeats, max(3, repeats // 5))
        times: dict[str, dict[int, float]] = {c: {} for c in configs}
        for rep in range(repeats):
            shift = rep % len(configs)
            for config in configs[shift:] + configs[:shift]:
                if config in slow and rep >= slow_repeats:
                    continue
                _sync(device)
                start = CLOCK()
                steps[config]()
                _sync(device)
                times[config][rep] = CLOCK() - start
        for config in configs:
            ratios = [t / times["plain"][rep] for rep, t in times[config].items()]
            probe = probes.get(config)
            rows.append(
                ProbeRow(
                    model=key,
                    config=config,
                    median_ms=1e3 * statistics.median(times[config].values()),
                    ratio=statistics.median(ratios),
                    target=PROBE_TARGETS.get(config, {}).get(key),
                    repeats=len(ratios),
                    excluded=dict(probe.stats.excluded) if probe is not None else {},
                )
            )
        print(f"  timed {key}: {', '.join(configs)}", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------- memory
def _rss_mb(field_name: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0), so imports and set-up do not
    hide the steps' own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        warnings.warn("cannot reset the peak RSS; memory figures may be too low", stacklevel=2)


def _release_free_memory() -> None:
    """Hand the C allocator's free pages back to the OS (glibc ``malloc_trim``), so that the
    resident set is the live memory again before a measurement; a no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


#: The later memory window starts after this many steps (see measure_memory_child).
STEADY_AFTER = 12


def measure_memory_child(
    key: str, config: str, device: str, batch_size: int | None
) -> tuple[float, float, float]:
    """Peak memory (MB) a configuration's steps add over the state right before them: over the
    first three steps (one-time checks included), then over three steps from step
    :data:`STEADY_AFTER` on (the steady state); and that state's tensor memory (MB).

    CPU: peak resident set (``VmHWM``) minus the resident set right before the steps (run in a
    fresh process, so the high-water mark is this configuration's own, after
    :func:`_load_code_pages`; before the later steps the allocator's free pages are handed back
    and the mark is reset); the state is the bytes of the parameters and the batch (the
    process's libraries are not training memory). CUDA:
    ``torch.cuda.max_memory_allocated`` over ``torch.cuda.memory_allocated`` at that state.
    """
    dev = torch.device(device)
    model, x, y = make_model(key, batch_size=batch_size)
    model, x, y = model.to(dev), x.to(dev), y.to(dev)
    step, _ = build_step(config, model, x, y)
    if dev.type == "cuda":
        peaks = []
        for window in range(2):
            for _ in range(STEADY_AFTER - 3 if window else 0):
                step()
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            for _ in range(3):
                step()
            torch.cuda.synchronize(dev)
            peaks.append((torch.cuda.max_memory_allocated(dev) - base) / 2**20)
        return peaks[0], peaks[1], base / 2**20
    _load_code_pages(key, config, dev, batch_size)
    tensors = [*model.parameters(), x, y]
    state_mb = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    peaks = []
    for window in range(2):
        if window:
            # The steady state: after the convolutions' route timing (up to 9 steps), whose
            # steps keep every output and run the slower routes too.
            for _ in range(STEADY_AFTER - 3):
                step()
        _release_free_memory()
        _reset_peak_rss()
        base = _rss_mb("VmRSS")
        for _ in range(3):
            step()
        peaks.append(_rss_mb("VmHWM") - base)
    return peaks[0], peaks[1], state_mb


def _load_code_pages(key: str, config: str, dev: torch.device, batch_size: int | None) -> None:
    """Run the configuration's steps once on a throwaway copy of the model (its own probe,
    hence its own one-time checks and route timing), then free it: the code of every kernel
    and Python path the steps use is then paged in, and the measured steps' resident set
    grows by their tensors only. Without it the first steps' figure also counted each kernel's
    first use of its library code, which is no training memory: 7 MB of the plain MLP's 10 and
    10 of the probed MLP's 15 (a 2-core x86 VM, torch 2.13). Tensor memory the probe keeps
    from its first step on is still in the figure where the measured steps allocate it; the
    convolution routes' workspaces (up to 2 MiB each, per thread, see
    ``lightning_gradwatch/probe/_conv_windows.py``) are allocated here instead, as by any earlier
    probe of the process."""
    model, x, y = make_model(key, batch_size=batch_size)
    model, x, y = model.to(dev), x.to(dev), y.to(dev)
    step, _ = build_step(config, model, x, y)
    for _ in range(STEADY_AFTER):
        step()
    del step, model, x, y
    gc.collect()


#: ``MALLOC_MMAP_THRESHOLD_`` of the memory subprocesses (bytes), unless ``--rss-allocator
#: default`` (see :func:`measure_memory`).
LIVE_MMAP_THRESHOLD = 131072


def measure_memory(
    keys: list[str],
    rows: list[ProbeRow],
    device: str,
    batch_size: int | None,
    live_tensors: bool = True,
) -> None:
    """Fill ``peak_mb`` of every row, each configuration in its own subprocess (two at a time:
    the figure is each process's own high-water mark, which a neighbour does not change).
    With ``live_tensors`` (CPU), the subprocesses' allocator maps every block above 128 KiB on
    its own, so their resident set follows the live tensors; without it, glibc's default
    settings, whose free lists hold freed blocks (different amounts from run to run)."""
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if live_tensors:
        # Blocks above 128 KiB get their own mappings, handed back when freed: the resident
        # set then follows the live tensors rather than what glibc's free lists keep.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(LIVE_MMAP_THRESHOLD))

    def run(row: ProbeRow) -> None:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-child",
            json.dumps([row.model, row.config, device, batch_size]),
            "--threads",
            str(torch.get_num_threads()),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            failure = done.stderr[-500:]
            print(f"  memory {row.model}/{row.config} failed: {failure}", file=sys.stderr)
            return
        row.peak_mb, row.steady_peak_mb, row.base_mb = json.loads(
            done.stdout.strip().splitlines()[-1]
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(run, rows))


def memory_ratio(row: ProbeRow, plain: ProbeRow | None, steady: bool = False) -> float | None:
    """Peak training memory of ``row`` over the plain step's: (state + extra peak) / (state +
    plain extra peak), both measured the same way (see :func:`measure_memory_child`), over the
    first steps or, with ``steady``, over the later ones."""
    if plain is None:
        return None
    row_peak = row.steady_peak_mb if steady else row.peak_mb
    plain_peak = plain.steady_peak_mb if steady else plain.peak_mb
    if row_peak is None or plain_peak is None or row.base_mb is None or plain.base_mb is None:
        return None
    return (row.base_mb + max(row_peak, 0.0)) / (plain.base_mb + max(plain_peak, 0.0))


def probe_table(rows: list[ProbeRow], unit: str) -> str:
    lines = [
        f"| model | configuration | step (ms) | ratio to plain | target | met | peak {unit} (MB) "
        f"| peak memory ratio, first steps / later steps (<= {MEMORY_TARGET}) | reps |",
        "|---|---|---:|---:|---:|:-:|---:|---:|---:|",
    ]
    plains = {(r.model, r.setting): r for r in rows if r.config == "plain"}
    for r in rows:
        target = f"<= {r.target:.2f}" if r.target is not None else ""
        met = "" if r.target is None else ("yes" if r.ratio <= r.target else "**no**")
        peaks = [p for p in (r.peak_mb, r.steady_peak_mb) if p is not None]
        peak = " / ".join(f"{p:.0f}" for p in peaks) if peaks else "n/a"
        plain = plains.get((r.model, r.setting))
        mems = [memory_ratio(r, plain), memory_ratio(r, plain, steady=True)]
        mem_text = " / ".join(f"{m:.2f}x" for m in mems if m is not None) or "n/a"
        note = f" (excluded: {', '.join(r.excluded)})" if r.excluded else ""
        lines.append(
            f"| {r.model} | {r.config}{note} | {r.median_ms:.1f} | {r.ratio:.2f}x | {target} "
            f"| {met} | {peak} | {mem_text} | {r.repeats} |"
        )
    return "\n".join(lines)


def time_scaling(repeats: int, warmup: int, device: torch.device, quick: bool) -> list[ProbeRow]:
    """The probe's overhead along each of :data:`SCALING_AXES` (dot+norm and +sum_sq against
    the plain step, interleaved as in :func:`time_probe_part`); ``quick`` is a smoke run with
    tiny batches and two points per axis."""
    rows: list[ProbeRow] = []
    for label, key, knob, values in SCALING_AXES:
        if quick:  # a smoke run: tiny batches, two points
            values = (2, 4) if knob == "batch_size" else values[:2]
        for value in values:
            kwargs = {knob: value}
            if quick and knob != "batch_size":
                kwargs["batch_size"] = 4
            batch_size = kwargs.pop("batch_size", None)
            found = time_probe_part(
                [key],
                repeats=repeats,
                warmup=warmup,
                device=device,
                with_backpack=False,
                batch_size=batch_size,
                only=("probe dot+norm", "probe dot+norm+sum_sq"),
                **kwargs,
            )
            for row in found:
                row.setting = f"{label} {value}"
            rows.extend(found)
    return rows


def scaling_table(rows: list[ProbeRow]) -> str:
    """One line per model and setting: plain step, and each configuration's ratio and extra
    milliseconds per step."""
    lines = [
        "| model | setting | plain step (ms) | dot+norm | +ms | dot+norm+sum_sq | +ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    by_setting: dict[tuple[str, str], dict[str, ProbeRow]] = {}
    for r in rows:
        by_setting.setdefault((r.model, r.setting), {})[r.config] = r
    for (model, setting), found in by_setting.items():
        plain = found["plain"]
        cells = []
        for config in ("probe dot+norm", "probe dot+norm+sum_sq"):
            r = found[config]
            cells += [f"{r.ratio:.2f}x", f"{r.median_ms - plain.median_ms:+.1f}"]
        lines.append(f"| {model} | {setting} | {plain.median_ms:.1f} | {' | '.join(cells)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- breakdown
def probe_breakdown(
    key: str, sum_grad_squared: bool, steps: int, batch_size: int | None = None
) -> str:
    """Where the probe's time goes on one model: milliseconds per step spent in each owning
    module's rule (``GradientProbe._compute``) and in assembling the statistics, beside the
    plain step and the whole probed step (interleaved). A diagnostic: it wraps private methods.
    """
    model, x, y = make_model(key, batch_size=batch_size)
    plain, _ = build_step("plain", model, x, y)
    probed, probe = make_probe_step(model, x, y, sum_grad_squared)
    spent: dict[str, float] = {}

    def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            start = CLOCK()
            try:
                return fn(*args)
            finally:
                spent[label] = spent.get(label, 0.0) + CLOCK() - start

        return wrapper

    compute = probe._compute

    def compute_by_owner(owner: Any) -> None:
        label = f"rule {type(owner.rule).__name__} on {owner.module_name or '<root>'}"
        timed(label, compute)(owner)

    probe._compute = compute_by_owner  # type: ignore[method-assign]
    probe._assemble = timed("assemble stats", probe._assemble)  # type: ignore[method-assign]
    for _ in range(3):
        plain()
        probed()
    spent.clear()
    plain_times, probed_times = [], []
    for _ in range(steps):
        for fn, times in ((plain, plain_times), (probed, probed_times)):
            start = CLOCK()
            fn()
            times.append(CLOCK() - start)
    plain_ms = 1e3 * statistics.median(plain_times)
    probed_ms = 1e3 * statistics.median(probed_times)
    title = "dot+norm+sum_sq" if sum_grad_squared else "dot+norm"
    lines = [
        f"### {key}, probe {title}: plain {plain_ms:.2f} ms, probed {probed_ms:.2f} ms "
        f"(+{probed_ms - plain_ms:.2f} ms)\n",
        "| part | ms per step (mean) | % of plain step |",
        "|---|---:|---:|",
    ]
    for label, total in sorted(spent.items(), key=lambda kv: -kv[1]):
        ms = 1e3 * total / steps
        lines.append(f"| {label} | {ms:.2f} | {100 * ms / plain_ms:.1f}% |")
    accounted = 1e3 * sum(spent.values()) / steps
    rest = probed_ms - plain_ms - accounted
    lines.append(
        f"| rest (hooks, captures, attach/detach, alignment) | {rest:.2f} | "
        f"{100 * rest / plain_ms:.1f}% |"
    )
    return "\n".join(lines)


# ============================================================================ callbacks part
class _StepTimer:
    """Two callbacks around the case's callbacks: the first stamps ``on_train_batch_start``
    and ``on_train_epoch_start`` (before theirs), the last stamps ``on_train_batch_end`` and
    ``on_train_epoch_end`` (after theirs)."""

    def __init__(self) -> None:
        from lightning.pytorch.callbacks import Callback

        timer = self

        class Start(Callback):
            def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
                timer._start = CLOCK()

            def on_train_epoch_start(self, *args: Any, **kwargs: Any) -> None:
                timer._epoch_start = CLOCK()

        class End(Callback):
            def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
                timer.durations.append(CLOCK() - timer._start)

            def on_train_epoch_end(self, *args: Any, **kwargs: Any) -> None:
                timer.epoch_durations.append(CLOCK() - timer._epoch_start)

        self._start = self._epoch_start = 0.0
        self.durations: list[float] = []
        self.epoch_durations: list[float] = []
        self.start, self.end = Start(), End()


def discover_cases() -> tuple[list[tuple[str, CallbackCase]], list[str]]:
    """Every ``CASES`` entry of every module in ``benchmarks/cases/``, with import failures."""
    import benchmarks.cases as package

    found: list[tuple[str, CallbackCase]] = []
    failures: list[str] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module_name = f"{package.__name__}.{info.name}"
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # a case whose callback is not merged yet must not stop the rest
            failures.append(f"{module_name}: {type(err).__name__}: {err}")
            continue
        for case in getattr(module, "CASES", []):
            found.append((info.name, case))
    return found, failures


def _fit_once(
    key: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    callbacks: list[Any],
    trainer_kwargs: dict[str, Any],
    steps: int,
    accelerator: str,
    epochs: int | None = None,
) -> list[float]:
    """Per-step durations of one ``fit`` of ``steps`` steps; with ``epochs``, per-epoch
    durations of ``epochs`` epochs of ``steps`` steps each instead."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    timer = _StepTimer()
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = pl.Trainer(
            max_steps=-1 if epochs else steps,
            max_epochs=epochs or 1,
            accelerator=accelerator,
            devices=1,
            logger=TensorBoardLogger(log_dir, name=key),
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[timer.start, *callbacks, timer.end],
            **trainer_kwargs,
        )
        trainer.fit(BenchModule(model), train_dataloaders=fixed_batch_loader(x, y, steps))
    return timer.epoch_durations if epochs else timer.durations


@dataclass
class CallbackRow:
    case: str
    model: str
    plain_ms: float
    case_ms: float
    ratio: float
    mean_ratio: float
    target: float | None
    error: str | None = None
    #: The lowest and highest of the runs' paired ratios: how far one run can stray (the
    #: machine's speed drifts between runs by as much as some budgets).
    ratio_range: tuple[float, float] = (float("nan"), float("nan"))


def time_callback_part(
    keys: list[str],
    repeats: int,
    steps: int,
    warmup: int,
    accelerator: str,
    batch_size: int | None = None,
    quick: bool = False,
    only: list[str] | None = None,
) -> tuple[list[CallbackRow], list[str]]:
    """Alternate short ``fit`` runs, plain and with the case's callbacks, ``repeats`` times each;
    per-step durations after ``warmup`` steps of each run, medians over all kept steps (per-epoch
    durations for a ``per_epoch`` case). The ratio is the median over runs of (case run median /
    paired plain run median)."""
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cases, failures = discover_cases()
    if only:
        cases = [(m, c) for m, c in cases if any(part in c.label for part in only)]
    rows: list[CallbackRow] = []
    for module_name, case in cases:
        for key in case.models:
            if key not in keys:
                continue
            model, x, y = make_model(key, batch_size=batch_size)
            plain: list[float] = []
            probed: list[float] = []
            ratios: list[float] = []
            error = None
            try:
                for rep in range(repeats):
                    order = ("plain", "case") if rep % 2 == 0 else ("case", "plain")
                    medians = {}
                    for which in order:
                        callbacks = case.make_callbacks() if which == "case" else []
                        if case.per_epoch:  # whole epochs; the first is the warm-up
                            run_steps, epochs, skip = (
                                (3, 2, 1) if quick else (case.steps_per_epoch, case.epochs, 1)
                            )
                        else:
                            run_steps, epochs, skip = steps, None, warmup
                        durations = _fit_once(
                            key,
                            copy.deepcopy(model),
                            x,
                            y,
                            callbacks,
                            case.trainer_kwargs,
                            run_steps,
                            accelerator,
                            epochs,
                        )[skip:]
                        (plain if which == "plain" else probed).extend(durations)
                        medians[which] = statistics.median(durations)
                    ratios.append(medians["case"] / medians["plain"])
            except Exception as err:  # report, and go on with the other cases
                error = f"{type(err).__name__}: {err}"
            rows.append(
                CallbackRow(
                    case=f"{case.label} ({module_name})",
                    model=key,
                    plain_ms=1e3 * statistics.median(plain) if plain else float("nan"),
                    case_ms=1e3 * statistics.median(probed) if probed else float("nan"),
                    ratio=statistics.median(ratios) if ratios else float("nan"),
                    mean_ratio=statistics.mean(probed) / statistics.mean(plain)
                    if plain and probed
                    else float("nan"),
                    target=case.target.get(key),
                    error=error,
                    ratio_range=(min(ratios), max(ratios)) if ratios else (math.nan, math.nan),
                )
            )
            print(f"  timed {case.label} on {key}", file=sys.stderr, flush=True)
    return rows, failures


def callback_table(rows: list[CallbackRow]) -> str:
    lines = [
        "| case | model | plain step (ms) | with callbacks (ms) | ratio | paired ratios, min-max "
        "| ratio of means | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        if r.error is not None:
            lines.append(f"| {r.case} | {r.model} | | | failed: {r.error[:120]} | | | | |")
            continue
        target = f"<= {r.target:.2f}" if r.target is not None else ""
        met = "" if r.target is None else ("yes" if r.ratio <= r.target else "**no**")
        lines.append(
            f"| {r.case} | {r.model} | {r.plain_ms:.1f} | {r.case_ms:.1f} | {r.ratio:.2f}x "
            f"| {r.ratio_range[0]:.2f}-{r.ratio_range[1]:.2f}x | {r.mean_ratio:.2f}x | {target} "
            f"| {met} |"
        )
    return "\n".join(lines)


# ============================================================================ CLI
def environment() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    import lightning_gradwatch

    engine = Path(lightning_gradwatch.__file__).parent
    return (
        f"engine {engine}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part",
        choices=("probe", "callbacks", "scaling", "all"),
        default="all",
        help="'all' is probe and callbacks; 'scaling' is the scaling table (its own run)",
    )
    parser.add_argument(
        "--models",
        default=",".join(MODEL_KEYS),
        help=f"comma-separated keys from {ALL_MODEL_KEYS} (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions")
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or process CPU time (robust on a shared machine; use with --threads 1)",
    )
    parser.add_argument(
        "--cb-steps",
        type=int,
        default=None,
        help="timed steps per fit run in the callback part (default 8; raise it to include "
        "work a callback does every N steps in the ratio of means)",
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="callback part: only cases whose label contains one of these comma-separated "
        "substrings (e.g. 'quick-start,gwa head')",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument(
        "--rss-allocator",
        choices=("live", "default"),
        default="live",
        help="CPU memory subprocesses: 'live' sets MALLOC_MMAP_THRESHOLD_=131072 so the "
        "resident set follows live tensors (default); 'default' keeps glibc's settings",
    )
    parser.add_argument("--no-backpack", action="store_true", help="leave BackPACK out")
    parser.add_argument("--device", default="cpu", help="torch device for the probe part")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="instead of the parts: time the probe's rules per module on each model",
    )
    parser.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.memory_child is not None:
        key, config, device, batch_size = json.loads(args.memory_child)
        print(json.dumps(measure_memory_child(key, config, device, batch_size)))
        return
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ALL_MODEL_KEYS]
    if unknown:
        raise SystemExit(f"unknown model keys {unknown}; choose from {ALL_MODEL_KEYS}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {args.device}: CUDA is not available here (torch.cuda.is_available() is "
            f"False, torch {torch.__version__}); run on a machine with an NVIDIA GPU and a CUDA "
            f"build of torch, or leave --device out to measure on the CPU."
        )
    quick = args.quick
    if quick and args.batch_size is None:
        args.batch_size = 8  # a smoke run: exercise every path, time nothing meaningful
    print(f"Environment: {environment()}, clock {args.clock}\n")
    if args.breakdown:
        for key in keys:
            for sum_sq in (False, True):
                print(probe_breakdown(key, sum_sq, args.repeats or 20, args.batch_size) + "\n")
        return

    if args.part in ("probe", "all"):
        repeats = args.repeats or (3 if quick else 30)
        with_backpack = not args.no_backpack and backpack_available()
        rows = time_probe_part(
            keys,
            repeats=repeats,
            warmup=1 if quick else 3,
            device=device,
            with_backpack=with_backpack,
            batch_size=args.batch_size,
        )
        if not args.no_memory and not quick:
            measure_memory(keys, rows, args.device, args.batch_size, args.rss_allocator == "live")
        unit = "extra allocated" if device.type == "cuda" else "extra RSS"
        print(f"## Probe overhead ({repeats} interleaved repetitions, medians)\n")
        print(probe_table(rows, unit))
        if not with_backpack:
            print("\nBackPACK not importable (or --no-backpack): its rows are left out.")
        print()

    if args.part == "scaling":
        repeats = args.repeats or (2 if quick else 15)
        rows_scaling = time_scaling(repeats, 1 if quick else 3, device, quick)
        print(f"## Scaling ({repeats} interleaved repetitions, medians)\n")
        print(scaling_table(rows_scaling))
        print()

    if args.part in ("callbacks", "all"):
        repeats = args.repeats or (1 if quick else 5)
        steps, warmup = (3, 1) if quick else (12, 4)
        if args.cb_steps is not None:
            steps = args.cb_steps + warmup
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        rows_cb, failures = time_callback_part(
            keys,
            repeats,
            steps,
            warmup,
            accelerator,
            batch_size=args.batch_size,
            quick=quick,
            only=[c.strip() for c in args.cases.split(",")] if args.cases else None,
        )
        print(
            f"## Callback overhead ({repeats} alternating fit runs each, {steps - warmup} timed "
            f"steps per run, medians)\n"
        )
        print(callback_table(rows_cb) if rows_cb else "No callback cases found.")
        for failure in failures:
            print(f"\nCould not import {failure}")
        print()


if __name__ == "__main__":
    main()
