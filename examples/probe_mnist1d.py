"""GradientProbe on MNIST-1D, without Lightning: per-sample statistics of a plain training loop.

Trains a small 1-D CNN on MNIST-1D (generated locally, no download) with 20% of the training
labels flipped, and prints per-epoch gradient-weight alignment of the classifier head, split
by clean and flipped samples: flipped samples pull against the weights.

Run: ``python examples/probe_mnist1d.py``
"""

from __future__ import annotations

import mnist1d.data
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradwatch import GradientProbe


def make_data(num_samples: int = 4000, noise: float = 0.2, seed: int = 0):
    args = mnist1d.data.get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    data = mnist1d.data.make_dataset(args)  # generated locally; never get_dataset (downloads)
    x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data["y"], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    flipped = torch.rand(len(y), generator=g) < noise
    y_noisy = torch.where(flipped, (y + torch.randint(1, 10, y.shape, generator=g)) % 10, y)
    return x, y_noisy, flipped


def main() -> None:
    torch.manual_seed(0)
    x, y, flipped = make_data()
    model = nn.Sequential(
        nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
        nn.Conv1d(32, 32, 5, padding=2, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 20, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip
    head = "7.weight"
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    probe = GradientProbe(model, params=[head])
    print("epoch  train_loss  align(clean)  align(flipped)  |g_i| median")
    for epoch in range(8):
        order = torch.randperm(len(y))
        scores = torch.empty(len(y))
        norms = torch.empty(len(y))
        total = 0.0
        for batch in order.split(128):
            optimizer.zero_grad()
            with probe:  # hooks live only inside the block
                loss = F.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
            scores[batch] = probe.stats.alignment([head])  # cos(-g_i, W) per sample
            norms[batch] = probe.stats.sq_norm[head].sqrt()
            optimizer.step()
            total += loss.item() * len(batch)
        print(
            f"{epoch:5d}  {total / len(y):10.4f}  {scores[~flipped].mean():12.4f}  "
            f"{scores[flipped].mean():14.4f}  {norms.median():12.4f}"
        )


if __name__ == "__main__":
    main()
