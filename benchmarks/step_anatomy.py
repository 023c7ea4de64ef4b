"""Where a monitored step's extra time goes, for budgets of a few percent.

Two measurements, each printed as a table:

- ``--part cold``: the time of small tensor ops run inside a gradient hook during the
  backward of the benchmark MLP, each op timed on its first call in the hook and again right
  after. The first call of each distinct op costs several times the second: the backward's
  own kernels have evicted the code and data the op's dispatch needs. A callback's per-step
  work pays that for every distinct op it runs, whatever the tensors' sizes.
- ``--part noise``: ``noise_statistics`` (the per-entry GSNR arithmetic ``GradientSNR`` runs on
  every computed step) on the benchmark MLP's parameter sizes and on 80 small layers, warm,
  beside one pass over the same entries: how many passes it costs, and what the number of
  layers adds.
- ``--part windows``: the convolutions' default per-sample route (``window_moments``: patches
  copied into a buffer, one batched product, the weight's inner products and norms), warm, on
  the benchmark CNNs' layers as they are (padded) and without their padding, which copies
  every kernel offset's windows at once instead of one offset at a time.
- ``--part hooks``: ``GradientWeightAlignment`` in head mode (defaults, TensorBoard logger) in
  ``Trainer.fit`` on a benchmark model, with ``time.perf_counter`` wrappers around the probe's
  hooks and the callback's own hooks: microseconds per step in each, beside the plain step.

Usage::

    python benchmarks/step_anatomy.py [--part cold|noise|windows|hooks|all] [--model mlp]
        [--steps 60]

Numbers, not tests; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.models import BenchModule, fixed_batch_loader, make_model


def cold_ops(model_key: str, steps: int) -> list[tuple[str, float]]:
    """Median microseconds of each timed op inside the head's output-gradient hook."""
    model, x, y = make_model(model_key)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    times: dict[str, list[float]] = {}
    kept: dict[str, torch.Tensor] = {}

    def timed(label: str, op: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = op()
        times.setdefault(label, []).append(time.perf_counter() - start)
        return result

    def on_output(grad: torch.Tensor) -> None:
        z = kept["z"]
        one = timed("torch.empty(1), first op in the hook", lambda: torch.empty(1))
        timed("add_ on a 1-element tensor, first call", lambda: one.add_(1.0))
        timed("vecdot (B, out), first call", lambda: torch.linalg.vecdot(grad, z))
        timed("vecdot (B, out), again", lambda: torch.linalg.vecdot(grad, z))
        timed("vector_norm (B, out), first call", lambda: torch.linalg.vector_norm(grad, dim=1))
        timed("vector_norm (B, out), again", lambda: torch.linalg.vector_norm(grad, dim=1))

    def on_forward(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        kept["z"] = output.detach()
        output.register_hook(on_output)

    handle = head.register_forward_hook(on_forward)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    handle.remove()
    skip = min(20, steps // 4)
    return [(label, 1e6 * statistics.median(v[skip:])) for label, v in times.items()]


def _process_micros(function: Callable[[], Any], repeats: int) -> float:
    """Microseconds of process CPU time per call of ``function``, after 5 warm-up calls."""
    for _ in range(5):
        function()
    start = time.process_time()
    for _ in range(repeats):
        function()
    return 1e6 * (time.process_time() - start) / repeats


def _noise_cost(sizes: list[int], repeats: int) -> tuple[float, float]:
    """(microseconds per ``noise_statistics`` call, per pass over the entries) for ``sizes``."""
    from lightning_gradwatch.functional.noise import noise_statistics

    generator = torch.Generator().manual_seed(0)
    grad_sum = torch.randn(sum(sizes), generator=generator)
    grad_sq_sum = grad_sum * grad_sum + torch.rand(sum(sizes), generator=generator)
    sums, squares = grad_sum.clone(), grad_sq_sum.clone()
    norms = torch.rand(len(sizes), generator=generator)
    count = torch.tensor(256.0)
    workspace: list[Any] = []

    def copies() -> None:  # fresh sums for every call: the callback's are consumed
        sums.copy_(grad_sum)
        squares.copy_(grad_sq_sum)

    def call() -> None:
        copies()
        noise_statistics(sums, squares, norms, count, sizes, workspace=workspace, consume=True)

    def one_pass() -> None:
        sums.mul_(1.0)

    call_us = _process_micros(call, repeats) - _process_micros(copies, repeats)
    return call_us, _process_micros(one_pass, repeats)


def noise_costs(repeats: int = 50) -> list[tuple[str, float, float]]:
    """(label, microseconds per ``noise_statistics`` call, microseconds per pass over the
    entries) for the benchmark MLP's parameter sizes and for 80 small tensors."""
    model, _, _ = make_model("mlp")
    mlp_sizes = [p.numel() for p in model.parameters()]
    many = [4096, 64] * 40
    sets = (
        (f"benchmark MLP, {len(mlp_sizes)} tensors, {sum(mlp_sizes)} entries", mlp_sizes),
        (f"{len(many)} tensors (40 x (4096 + 64)), {sum(many)} entries", many),
    )
    return [(label, *_noise_cost(sizes, repeats)) for label, sizes in sets]


def window_costs(repeats: int = 50) -> list[tuple[str, float]]:
    """(layer, microseconds per ``window_moments`` call) for each convolution of the benchmark
    CNNs, on the input it sees in the benchmark (its full batch), as it is and with its padding
    removed (the input then as large as the padded one, so the output keeps its size)."""
    from lightning_gradwatch.probe._conv_windows import window_moments

    rows = []
    for key in ("cnn", "cnn2d"):
        model, x, _ = make_model(key)
        with torch.no_grad():
            for module in model:
                if isinstance(module, torch.nn.modules.conv._ConvNd):
                    unpadded = copy.deepcopy(module)
                    unpadded.padding = (0,) * len(module.kernel_size)
                    grow = [2 * p for p in module.padding]
                    wider = torch.nn.functional.pad(
                        x, [g // 2 for g in reversed(grow) for _ in range(2)]
                    )
                    for label, conv, inputs in (
                        ("padded", module, x),
                        ("no padding", unpadded, wider),
                    ):
                        delta = torch.randn_like(conv(inputs))
                        weight = conv.weight.detach()

                        def call(
                            conv: Any = conv,
                            inputs: Any = inputs,
                            delta: Any = delta,
                            weight: Any = weight,
                        ) -> None:
                            window_moments(inputs, delta, conv, weight, False, False, 2**24)

                        name = f"{key} {module}, {label}, input {tuple(inputs.shape)}"
                        rows.append((name, _process_micros(call, repeats)))
                x = module(x)
    return rows


def hook_costs(
    model_key: str, steps: int, epochs: int = 4
) -> tuple[float, float, dict[str, float]]:
    """(plain ms per step, GWA head ms per step, microseconds per step in each hook)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    import lightning_gradwatch.probe.capture as capture
    import lightning_gradwatch.probe.finalize as finalize
    from lightning_gradwatch import GradientWeightAlignment

    spent: dict[str, float] = {}

    def add(label: str, start: float) -> None:
        spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

    def timed(function: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                add(label, start)

        return wrapper

    def wrap_method(owner: type, name: str, label: str) -> Callable[[], None]:
        original = getattr(owner, name)
        setattr(owner, name, timed(original, label))
        return lambda: setattr(owner, name, original)

    def wrap_factory(name: str, label: str) -> Callable[[], None]:
        # The probe's hooks are closures made per module: time what the factory returns.
        original = getattr(capture._Capture, name)

        def factory(self: Any, *args: Any, **kwargs: Any) -> Any:
            return timed(original(self, *args, **kwargs), label)

        setattr(capture._Capture, name, factory)
        return lambda: setattr(capture._Capture, name, original)

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.durations: list[float] = []

        def on_train_epoch_start(self, *args: Any) -> None:
            self.start = time.process_time()

        def on_train_epoch_end(self, *args: Any) -> None:
            self.durations.append(time.process_time() - self.start)

    def fit(callbacks: list[Any]) -> float:
        model, x, y = make_model(model_key)
        timer = EpochTimer()
        with tempfile.TemporaryDirectory() as log_dir:
            trainer = pl.Trainer(
                max_epochs=epochs,
                logger=TensorBoardLogger(log_dir),
                callbacks=[*callbacks, timer],
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                num_sanity_val_steps=0,
                accelerator="cpu",
            )
            trainer.fit(BenchModule(model), train_dataloaders=fixed_batch_loader(x, y, steps))
        return statistics.median(timer.durations[1:]) / steps

    plain = fit([])
    undo = [
        wrap_factory("_make_forward_hook", "probe: forward hook (capture)"),
        wrap_factory("_make_grad_hook", "probe: output-gradient hook (the rule)"),
        wrap_method(finalize._Finalize, "_finalize", "probe: end of backward (assembly)"),
    ]
    for hook in ("on_train_batch_start", "on_before_backward", "on_after_backward"):
        undo.append(wrap_method(GradientWeightAlignment, hook, f"callback: {hook}"))
    undo.append(
        wrap_method(GradientWeightAlignment, "on_train_batch_end", "callback: on_train_batch_end")
    )
    try:
        spent.clear()
        head = fit([GradientWeightAlignment(indices=None)])
    finally:
        for restore in undo:
            restore()
    per_step = {label: 1e6 * seconds / (epochs * steps) for label, seconds in spent.items()}
    return 1e3 * plain, 1e3 * head, per_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part", choices=("cold", "noise", "windows", "hooks", "all"), default="all"
    )
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.part in ("cold", "all"):
        steps = max(args.steps, 40) * 5
        print(f"## Ops in a gradient hook during the backward ({args.model}, {steps} steps)\n")
        print("| op | median (us) |\n|---|---:|")
        for label, micros in cold_ops(args.model, steps):
            print(f"| {label} | {micros:.1f} |")
        print()
    if args.part in ("noise", "all"):
        print("## noise_statistics, warm (the sums consumed, as GradientSNR calls it)\n")
        print("| layers | us per call | us per pass over the entries |\n|---|---:|---:|")
        for label, call_us, pass_us in noise_costs():
            print(f"| {label} | {call_us:.0f} | {pass_us:.0f} |")
        print()
    if args.part in ("windows", "all"):
        print("## window_moments, warm (the convolutions' default route)\n")
        print("| layer | us per call |\n|---|---:|")
        for label, micros in window_costs():
            print(f"| {label} | {micros:.0f} |")
        print()
    if args.part in ("hooks", "all"):
        plain, head, per_step = hook_costs(args.model, args.steps)
        print(f"## GWA head, per step inside each hook ({args.model}, {args.steps} steps/epoch)\n")
        print(f"Plain step {plain:.2f} ms; with GWA head {head:.2f} ms ({head / plain:.3f}x).\n")
        print("| where | us per step |\n|---|---:|")
        for label, micros in sorted(per_step.items(), key=lambda item: -item[1]):
            print(f"| {label} | {micros:.0f} |")
        print(
            "\nThe rows do not overlap: the probe's hooks run inside the forward and the "
            "backward, the callback's in Lightning's hooks around them."
        )


if __name__ == "__main__":
    main()
