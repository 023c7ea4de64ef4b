"""GWA early stopping against a 10% validation split on MNIST-1D with label noise.

Repeats ``examples/mnist1d_gwa.py`` over seeds and noise rates and prints, per noise rate, the
mean and standard deviation over seeds of the clean test accuracy of each selection rule, the
gap GWA minus validation split, and the AUROC of ``-gamma`` for flagging corrupted labels.

Run: ``python benchmarks/early_stopping.py --seeds 0 1 2 3 4 --noise 0 0.2 0.4 --workers 2``
(each worker is one process with one torch thread). Results also go to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

RULES = (
    "GWA",
    "10% validation split (trained on 90%)",
    "last epoch",
    "oracle (best test epoch)",
)


def _one(job: tuple[int, float, int]) -> dict[str, Any]:
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from mnist1d_gwa import run_experiment

    seed, noise, epochs = job
    start = time.perf_counter()
    result = run_experiment(seed=seed, noise=noise, epochs=epochs, logdir=None)
    result["seconds"] = time.perf_counter() - start
    print(
        f"seed {seed} noise {noise:.0%}: "
        + ", ".join(f"{r.split(' (')[0]} {e}/{a:.3f}" for r, (e, a) in result["rows"].items())
        + f", AUROC {result['auroc']['gwa_epoch']:.3f} ({result['seconds']:.0f} s)",
        flush=True,
    )
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| noise | rule | selected epoch (mean) | clean test acc. mean ± std |",
        "|---|---|---|---|",
    ]
    summary = []
    for noise in sorted({r["noise"] for r in results}):
        group = [r for r in results if r["noise"] == noise]
        for rule in RULES:
            epochs = np.array([r["rows"][rule][0] for r in group])
            acc = np.array([r["rows"][rule][1] for r in group]) * 100
            lines.append(
                f"| {noise:.0%} | {rule} | {epochs.mean():.1f} | "
                f"{acc.mean():.2f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.2f} |"
            )
        gap = np.array([r["rows"][RULES[0]][1] - r["rows"][RULES[1]][1] for r in group]) * 100
        auroc = np.array([r["auroc"]["gwa_epoch"] for r in group])
        auroc_last = np.array([r["auroc"]["last_epoch"] for r in group])
        summary.append(
            f"| {noise:.0%} | {len(group)} | {gap.mean():+.2f} ± "
            f"{gap.std(ddof=1) if len(gap) > 1 else 0:.2f} | {int((gap >= 0).sum())}/{len(gap)} | "
            + (
                f"{auroc.mean():.3f} ± {auroc.std(ddof=1) if len(auroc) > 1 else 0:.3f} | "
                f"{auroc_last.mean():.3f} |"
                if np.isfinite(auroc).all()
                else "n/a (no corrupted labels) | n/a |"
            )
        )
    lines += [
        "",
        "| noise | seeds | GWA - val. split (points) mean ± std | GWA ≥ val. split | "
        "AUROC of -gamma (GWA epoch) | AUROC (last epoch) |",
        "|---|---|---|---|---|---|",
        *summary,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/early_stopping_results.json")
    args = parser.parse_args()
    jobs = [(s, n, args.epochs) for n in args.noise for s in args.seeds]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(_one, jobs))
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    print(
        f"\n{len(args.seeds)} seeds, {args.epochs} epochs, machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {platform.system()}; {time.perf_counter() - start:.0f} s\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
