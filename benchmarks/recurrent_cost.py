"""What the recurrent rule costs: a training step of a small LSTM/GRU classifier, plain, with
``GradientProbe`` (dot + squared norm, then also ``sum_sq``), and with the generic route,
``torch.func.vmap(grad)`` over the whole model (which has no batching rule for the fused
recurrent kernel and falls back to a loop over samples).

Every configuration does one full step (forward, backward, SGD step) on one fixed batch; the
table reports the median wall time over the repetitions and its ratio to the plain step.

    python benchmarks/recurrent_cost.py [--repeats 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_gradwatch import GradientProbe


class Classifier(nn.Module):
    """A recurrent encoder, its last layer's final hidden state, a Linear head."""

    def __init__(self, kind: str, features: int, hidden: int, layers: int) -> None:
        super().__init__()
        rnn_type = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = rnn_type(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        _, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state
        return self.head(h_n[-1])


def _steps(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Callable[[], None]]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    probe = GradientProbe(model)
    probe_sq = GradientProbe(model, sum_grad_squared=True)

    def plain() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def probed(p: GradientProbe) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad()
            with p:
                F.cross_entropy(model(x), y).backward()
            p.stats.alignment()
            optimizer.step()

        return step

    def vmap_grad() -> None:
        params = {n: p.detach() for n, p in model.named_parameters()}

        def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        for name, g in grads.items():
            flat = g.flatten(1)
            flat @ params[name].reshape(-1)
            flat.pow(2).sum(1)
            g.pow(2).sum(0)
        for name, p in model.named_parameters():
            p.grad = grads[name].mean(0)
        optimizer.step()

    return {
        "plain": plain,
        "probe dot+norm": probed(probe),
        "probe +sum_sq": probed(probe_sq),
        "vmap(grad)": vmap_grad,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="There is a performance drop")
    configs = [
        ("lstm", 32, 32, 32, 64, 2),
        ("gru", 32, 32, 32, 64, 2),
        ("lstm", 64, 16, 64, 128, 1),
    ]
    print("| model | B | T | in | hidden | layers | method | ms/step | x plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, batch, steps, features, hidden, layers in configs:
        torch.manual_seed(0)
        model = Classifier(kind, features, hidden, layers)
        x, y = torch.randn(batch, steps, features), torch.randint(0, 10, (batch,))
        times: dict[str, float] = {}
        for name, step in _steps(model, x, y).items():
            try:
                step()  # warm-up
            except RuntimeError as err:  # the generic route on a kernel it cannot batch
                print(
                    f"| {kind} | {batch} | {steps} | {features} | {hidden} | {layers} | "
                    f"{name} | fails: {str(err).splitlines()[0]} | |"
                )
                continue
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                step()
                runs.append(time.perf_counter() - start)
            times[name] = statistics.median(runs) * 1e3
            print(
                f"| {kind} | {batch} | {steps} | {features} | {hidden} | {layers} | {name} | "
                f"{times[name]:.1f} | {times[name] / times['plain']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
