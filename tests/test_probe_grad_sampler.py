"""The minimal rule contract: a layer supported by one per-sample gradient function
(``register_grad_sampler``), checked against the float64 brute-force oracle."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_oracle, run_probe
from torch import Tensor, nn

from lightning_gradwatch.probe import register_grad_sampler, register_norm_sampler


class ScaledLinear(nn.Module):
    """``y = (x W^T) * s + b`` on ``(B, T, K)`` inputs: a layer no built-in rule knows."""

    def __init__(self, k: int, o: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, k, dtype=torch.float64))
        self.scale = nn.Parameter(torch.randn(o, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(o, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.weight.T) * self.scale + self.bias


calls: list[str] = []


def _per_sample(
    module: ScaledLinear, inputs: tuple[Tensor, ...], grad_outputs: tuple[Tensor, ...]
) -> dict[str, Tensor]:
    (x,), (delta,) = inputs, grad_outputs
    return {
        "weight": torch.einsum("bto,btk->bok", delta * module.scale, x),
        "scale": (delta * (x @ module.weight.T)).sum(1),
        "bias": delta.sum(1),
    }


@register_grad_sampler(ScaledLinear)
def scaled_linear_grad_sample(
    module: ScaledLinear, inputs: tuple[Tensor, ...], grad_outputs: tuple[Tensor, ...]
) -> dict[str, Tensor]:
    calls.append("grad_sample")
    return _per_sample(module, inputs, grad_outputs)


class NormedScaledLinear(ScaledLinear):
    """The same layer with a fast path for dot and norm registered too."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)


register_grad_sampler(NormedScaledLinear)(scaled_linear_grad_sample)


@register_norm_sampler(NormedScaledLinear)
def scaled_linear_norms(
    module: NormedScaledLinear, inputs: tuple[Tensor, ...], grad_outputs: tuple[Tensor, ...]
) -> dict[str, tuple[Tensor, Tensor]]:
    calls.append("norms")
    grads = _per_sample(module, inputs, grad_outputs)
    params = dict(module.named_parameters())
    return {
        n: (g.flatten(1) @ params[n].detach().reshape(-1), g.flatten(1).pow(2).sum(1))
        for n, g in grads.items()
    }


def _model(layer: type[ScaledLinear] = ScaledLinear) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(layer(5, 4), nn.Tanh(), nn.Linear(4, 3, dtype=torch.float64))


def _batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 5, dtype=torch.float64, generator=generator)
    return x, torch.randn(6, 3, 3, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_sampler_matches_oracle(reduction: str) -> None:
    x, y = _batch()
    calls.clear()
    assert_matches_oracle(_model(), x, y, reduction=reduction)
    assert calls == ["grad_sample"]


def test_grad_sampler_in_chunks_matches_oracle() -> None:
    x, y = _batch()
    calls.clear()
    # 4*5 + 4 + 4 = 28 elements per sample: chunks of 2 samples.
    assert_matches_oracle(_model(), x, y, chunk_elements=60)
    assert calls == ["grad_sample"] * 3


def test_norm_sampler_fast_path_matches_oracle() -> None:
    x, y = _batch()
    calls.clear()
    assert_matches_oracle(_model(NormedScaledLinear), x, y, sum_grad_squared=False)
    assert calls == ["norms"]
    calls.clear()  # sum_sq needs the per-sample gradients: the materialising route
    assert_matches_oracle(_model(NormedScaledLinear), x, y, sum_grad_squared=True)
    assert calls == ["grad_sample"]


class TwiceScaled(nn.Module):
    """One ScaledLinear called twice in one forward: per-sample gradients add."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = NormedScaledLinear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(torch.tanh(self.layer(x)))


def test_grad_sampler_module_called_twice_matches_oracle() -> None:
    torch.manual_seed(0)
    x, _ = _batch()
    x = x[..., :4]
    y = torch.randn(6, 3, 4, dtype=torch.float64)
    calls.clear()
    assert_matches_oracle(TwiceScaled(), x, y, sum_grad_squared=False)
    assert calls == ["grad_sample", "grad_sample"]  # no fast path for two calls


class Unregistered(ScaledLinear):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)


def test_bad_shape_from_grad_sampler_raises() -> None:
    @register_grad_sampler(Unregistered)
    def wrong(module: nn.Module, inputs: tuple, grad_outputs: tuple) -> dict[str, Tensor]:
        return {n: p.detach().expand(2, *p.shape) for n, p in module.named_parameters()}

    x, y = _batch()
    with pytest.raises(ValueError, match=r"expected \(B, \*param.shape\)"):
        run_probe(_model(Unregistered), x, y)


def test_norm_sampler_needs_grad_sampler_first() -> None:
    class Lonely(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x)

    with pytest.raises(ValueError, match="register_grad_sampler"):
        register_norm_sampler(Lonely)(scaled_linear_norms)
