"""Probe dot+norm on hand-written attention blocks that call ``nn.MultiheadAttention`` with its
default arguments (``need_weights=True``) and drop the returned weights, as much user code
does; optionally with an unused auxiliary ``nn.Linear`` head per block, an output that never
gets a gradient on any step.

Prints the paired ratio of a probed step to a plain one (process CPU time, interleaved, one
torch thread). Run it with ``PYTHONPATH=<another checkout>`` to time that checkout's engine.

Usage::

    python benchmarks/attention_blocks.py [--blocks 2] [--repeats 15] [--aux-head]

Numbers, not tests; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor, nn

import lightning_gradwatch
from lightning_gradwatch import GradientProbe


class Block(nn.Module):
    """Self-attention with default arguments, LayerNorms and a GELU feed-forward."""

    def __init__(self, width: int, aux_head: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.aux = nn.Linear(width, 4) if aux_head else None

    def forward(self, x: Tensor) -> Tensor:
        attended, _ = self.attn(x, x, x)  # the weights are returned and dropped
        if self.aux is not None:
            self.aux(x)  # computed, never used
        x = self.norm1(x + attended)
        return self.norm2(x + self.ff(x))


def ratio(blocks: int, repeats: int, aux_head: bool) -> tuple[float, float]:
    """(median probed / plain ratio over ``repeats`` pairs, plain step in ms)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(128, aux_head) for _ in range(blocks)], nn.Linear(128, 10))
    x = torch.randn(32, 64, 128)
    probe = GradientProbe(model, verify="never")

    def plain() -> None:
        model.zero_grad()
        model(x).pow(2).mean().backward()

    def probed() -> None:
        model.zero_grad()
        with probe:
            model(x).pow(2).mean().backward()

    for step in (plain, probed, plain, probed):  # warm-up
        step()
    ratios, plain_times = [], []
    for rep in range(repeats):
        order = ((plain, "plain"), (probed, "probed"))
        times = {}
        for step, name in order if rep % 2 == 0 else order[::-1]:
            start = time.process_time()
            step()
            step()
            times[name] = (time.process_time() - start) / 2
        ratios.append(times["probed"] / times["plain"])
        plain_times.append(times["plain"])
    return statistics.median(ratios), 1e3 * statistics.median(plain_times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--aux-head", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    value, plain_ms = ratio(args.blocks, args.repeats, args.aux_head)
    print(
        f"engine {lightning_gradwatch.__file__.rsplit('/', 2)[0]}: {args.blocks} blocks"
        f"{' with unused heads' if args.aux_head else ''}, plain step {plain_ms:.1f} ms, "
        f"probe dot+norm {value:.2f}x"
    )


if __name__ == "__main__":
    main()
