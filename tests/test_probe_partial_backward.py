"""A backward that does not reach every probed layer: ``backward(inputs=...)`` and
``torch.autograd.grad`` run only the part of the graph on a path to the tensors they are
asked for. The layers they skip get no output gradient, exactly like a layer whose output
does not reach the loss, but their per-sample gradients are not zero. The probe must refuse
them (``stats.excluded``, one warning), keep the layers the backward reached at the oracle's
values, and keep reporting exact zeros for an output that does not reach the loss in a
backward that prunes nothing.
"""

from __future__ import annotations

import itertools
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from conftest import assert_close, partial_backward, squared_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import expected_stats, per_sample_grads
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientProbe, GradientWeightAlignment, IndexedDataset, keys

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UNREACHED = "did not form the gradient of its output"


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers).double()


def _oracle(model: nn.Module, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], ...]:
    names = [n for n, _ in model.named_parameters()]
    dot, sq, _ = expected_stats(model, per_sample_grads(model, squared_error, x, y, names))
    return dot, sq


@SETTINGS
@given(
    widths=st.lists(st.integers(1, 6), min_size=3, max_size=5),
    batch=st.integers(1, 5),
    pick=st.integers(0, 10),
    how=st.sampled_from(["backward", "autograd.grad"]),
    sum_sq=st.booleans(),
)
def test_layers_below_the_inputs_are_refused(
    widths: list[int], batch: int, pick: int, how: str, sum_sq: bool
) -> None:
    """Asked for one layer's parameters, the backward reaches that layer and those above it
    (exact), and skips those below it (refused, not zero)."""
    torch.manual_seed(batch + 7 * pick)
    model = _mlp(widths)
    x, y = torch.randn(batch, widths[0]).double(), torch.randn(batch, widths[-1]).double()
    dot, sq = _oracle(model, x, y)
    linears = [name for name, m in model.named_children() if isinstance(m, nn.Linear)]
    target = linears[pick % len(linears)]
    asked = list(model.get_submodule(target).parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradientProbe(model, sum_grad_squared=sum_sq, verify="never") as probe:
            partial_backward(squared_error(model(x), y).mean(), asked, how)
    stats = probe.stats
    below = linears[: linears.index(target)]
    for layer in linears:
        for name in (f"{layer}.weight", f"{layer}.bias"):
            if layer in below:
                assert name not in stats.dot, f"{name} reported though the backward skipped it"
                assert UNREACHED in stats.excluded[name]
            else:
                assert name not in stats.excluded
                assert_close(stats.dot[name], dot[name], f"dot[{name}]")
                assert_close(stats.sq_norm[name], sq[name], f"sq_norm[{name}]")
    refusals = [w for w in caught if UNREACHED in str(w.message)]
    assert len(refusals) == len(below)


def test_plain_backward_keeps_zeros_for_an_output_off_the_loss() -> None:
    """An auxiliary head whose output the loss does not use: its per-sample gradients are
    zero, in a plain backward and in ``autograd.grad`` with respect to every parameter."""
    torch.manual_seed(0)
    trunk, head, aux = nn.Linear(3, 4).double(), nn.Linear(4, 2).double(), nn.Linear(4, 5).double()
    model = nn.ModuleDict({"trunk": trunk, "head": head, "aux": aux})
    x, y = torch.randn(6, 3).double(), torch.randn(6, 2).double()
    for how in ("backward", "autograd.grad"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no refusal
            with GradientProbe(model, verify="never") as probe:
                hidden = torch.tanh(trunk(x))
                aux(hidden)  # computed, never used
                loss = squared_error(head(hidden), y).mean()
                if how == "backward":
                    loss.backward()
                else:
                    torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        stats = probe.stats
        assert not stats.excluded
        for name in ("aux.weight", "aux.bias"):
            assert torch.equal(stats.dot[name], torch.zeros(6, dtype=torch.float64))
            assert torch.equal(stats.sq_norm[name], torch.zeros(6, dtype=torch.float64))
        assert stats.sq_norm["trunk.weight"].abs().sum() > 0


def test_pruned_backward_refuses_an_output_it_cannot_place() -> None:
    """In a backward that prunes the graph, a layer whose output got no gradient may be off
    the loss or skipped: the probe cannot tell, so it refuses rather than report zeros."""
    torch.manual_seed(1)
    trunk, head, aux = nn.Linear(3, 4).double(), nn.Linear(4, 2).double(), nn.Linear(4, 5).double()
    model = nn.ModuleDict({"trunk": trunk, "head": head, "aux": aux})
    x, y = torch.randn(6, 3).double(), torch.randn(6, 2).double()
    probe = GradientProbe(model, verify="never")
    with pytest.warns(UserWarning, match=UNREACHED), probe:
        hidden = torch.tanh(trunk(x))
        aux(hidden)
        squared_error(head(hidden), y).mean().backward(inputs=[head.weight])
    assert set(probe.stats.excluded) >= {"aux.weight", "aux.bias", "trunk.weight", "trunk.bias"}
    assert "head.weight" in probe.stats.dot


def test_attention_below_the_inputs() -> None:
    """A transformer layer asked only for its feed-forward output weight: the attention and
    the first feed-forward layer are skipped, so refused; the asked layer is exact."""
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    x, y = torch.randn(3, 4, 8).double(), torch.randn(3, 4, 8).double()
    dot, sq = _oracle(layer, x, y)
    probe = GradientProbe(layer, verify="never")
    with pytest.warns(UserWarning, match=UNREACHED), probe:
        squared_error(layer(x), y).mean().backward(inputs=[layer.linear2.weight])
    stats = probe.stats
    for name in ("linear2.weight", "linear2.bias", "norm2.weight", "norm2.bias"):
        assert_close(stats.dot[name], dot[name], f"dot[{name}]")
        assert_close(stats.sq_norm[name], sq[name], f"sq_norm[{name}]")
    for name in ("self_attn.in_proj_weight", "linear1.weight", "norm1.weight"):
        assert UNREACHED in stats.excluded[name]


class _TwoHeads(nn.Module):
    """Two branches from the input, summed into one loss: a backward asked for one head's
    parameters skips the other branch, beside (not below) everything it reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.left(x)) + self.right(x)


@pytest.mark.parametrize("how", ["backward", "autograd.grad"])
def test_branch_beside_the_inputs_is_refused_given_the_loss(how: str) -> None:
    """Named with ``set_loss``, the loss lets the probe see the skipped branch."""
    torch.manual_seed(3)
    model = _TwoHeads().double()
    x, y = torch.randn(4, 3).double(), torch.randn(4, 2).double()
    dot, sq = _oracle(model, x, y)
    asked = list(model.right.parameters())
    probe = GradientProbe(model, verify="never")
    with pytest.warns(UserWarning, match=UNREACHED), probe:
        loss = squared_error(model(x), y).mean()
        probe.set_loss(loss)
        partial_backward(loss, asked, how)
    stats = probe.stats
    assert UNREACHED in stats.excluded["left.weight"]
    assert UNREACHED in stats.excluded["left.bias"]
    for name in ("right.weight", "right.bias"):
        assert_close(stats.dot[name], dot[name], f"dot[{name}]")
        assert_close(stats.sq_norm[name], sq[name], f"sq_norm[{name}]")
    assert probe._root_node is None  # not held past the backward


def test_set_loss_keeps_zeros_in_a_plain_backward() -> None:
    """With the loss named, a full backward still reports an output off the loss as zeros
    and refuses nothing (every node below the loss runs)."""
    torch.manual_seed(4)
    model = nn.ModuleDict({"body": nn.Linear(3, 4), "aux": nn.Linear(4, 1)}).double()
    x = torch.randn(5, 3).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with GradientProbe(model, verify="never") as probe:
            hidden = model["body"](x)
            model["aux"](hidden)
            loss = hidden.pow(2).sum(1).mean()
            probe.set_loss(loss)
            loss.backward()
    assert not probe.stats.excluded
    assert torch.equal(probe.stats.dot["aux.weight"], torch.zeros(5, dtype=torch.float64))


class _OneHeadBackward(pl.LightningModule):
    """A LightningModule whose ``backward`` asks autograd for the right head only."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _TwoHeads()

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return squared_error(self.model(batch[0]), batch[1]).mean()

    def backward(self, loss: Tensor, *args: object, **kwargs: object) -> None:
        loss.backward(inputs=list(self.model.right.parameters()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_refuses_the_branch_a_custom_backward_skips() -> None:
    """Under Lightning the callbacks name the loss for the probe (``on_before_backward``):
    the left branch, beside the right head the backward was asked for, is refused."""
    torch.manual_seed(5)
    data = TensorDataset(torch.randn(8, 3).double(), torch.randn(8, 2).double())
    gwa = GradientWeightAlignment(params=["model.left.weight", "model.right.weight"], indices=-1)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[gwa],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_OneHeadBackward(), DataLoader(IndexedDataset(data), batch_size=4))
    messages = [str(w.message) for w in caught]
    assert any("excluded ['model.left.weight']" in m and UNREACHED in m for m in messages)
    # The left layer has no epoch aggregate: nothing written for it, and no torchmetrics
    # warning about computing a metric that was never updated.
    assert not any("``compute`` method" in m for m in messages), messages
    logged = trainer.callback_metrics
    assert keys.layer_key(keys.GWA_FAMILY, "aggregate", "model.left.weight") not in logged
    assert keys.layer_key(keys.GWA_FAMILY, "aggregate", "model.right.weight") in logged
    assert math.isnan(gwa.layer_history["model.left.weight"][0])
    assert gwa.probe is not None and gwa.probe._root_node is None


class _Checkpointed(nn.Module):
    """A checkpointed block between two layers, and an auxiliary head off the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.block = nn.Linear(3, 4), nn.Linear(4, 4)
        self.aux, self.head = nn.Linear(4, 2), nn.Linear(4, 2)
        self.reentrant = True

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.tanh(self.first(x))
        hidden = torch.utils.checkpoint.checkpoint(
            lambda t: torch.tanh(self.block(t)), hidden, use_reentrant=self.reentrant
        )
        self.aux(hidden)  # computed, never used
        return self.head(hidden)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_block_keeps_zeros_off_the_loss(reentrant: bool) -> None:
    """A reentrant checkpoint runs the block's backward as a backward of its own, over
    another graph: its nodes are not searched for the outer backward's pruning, so the
    auxiliary head's zeros stand and nothing is refused."""
    torch.manual_seed(6)
    model = _Checkpointed().double()
    x, y = torch.randn(5, 3).double(), torch.randn(5, 2).double()
    model.reentrant = False  # the oracle's autograd.grad cannot run a reentrant checkpoint
    dot, sq = _oracle(model, x, y)
    model.reentrant = reentrant
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with GradientProbe(model, verify="never") as probe:
            loss = squared_error(model(x), y).mean()
            probe.set_loss(loss)
            loss.backward()
    stats = probe.stats
    assert not stats.excluded
    for name in dot:
        assert_close(stats.dot[name], dot[name], f"dot[{name}]")
        assert_close(stats.sq_norm[name], sq[name], f"sq_norm[{name}]")
