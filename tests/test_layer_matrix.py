"""Every supported layer configuration against the float64 per-sample oracle, both reductions.

One row per case: a model builder and an input builder. Each row checks ``dot``, ``sq_norm``,
``sum_sq`` and ``grad_sum`` of every trainable parameter (and the alignments) against one
backward per sample, at ``rtol=1e-6`` in float64 (see ``conftest.assert_matches_oracle``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_oracle, squared_error
from torch import Tensor, nn

# vmap has no batching rule for the CPU flash-attention kernel: a speed warning, not accuracy.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

B = 3
f64 = torch.float64


def _randn(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=f64)


class _Head(nn.Module):
    """``layer`` followed by a fixed non-linearity, so that backprops differ per position."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.layer(*args, **kwargs)
        return torch.tanh(out[0] if isinstance(out, tuple) else out)


class _Attention(nn.Module):
    """Self-attention over ``(B, T, E)`` in either layout, with an optional mask."""

    def __init__(self, batch_first: bool, mask: str | None, bias_kv: bool = False) -> None:
        super().__init__()
        # add_bias_kv: the generic per-sample replay instead of the attention rule's own.
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, add_bias_kv=bias_kv)
        self.batch_first, self.mask = batch_first, mask

    def forward(self, x: Tensor) -> Tensor:
        batch, steps, _ = x.shape
        kwargs: dict[str, Tensor] = {}
        if self.mask == "key_padding":
            padding = torch.zeros(batch, steps, dtype=torch.bool)
            padding[0, -1] = True
            kwargs["key_padding_mask"] = padding
        elif self.mask == "causal":
            kwargs["attn_mask"] = torch.triu(torch.ones(steps, steps, dtype=torch.bool), 1)
        q = x if self.batch_first else x.transpose(0, 1)
        out, _ = self.attn(q, q, q, **kwargs)
        return torch.tanh(out if self.batch_first else out.transpose(0, 1))


class _SeqFirstEncoder(nn.Module):
    """A sequence-first encoder layer fed ``(B, T, E)``: transposes at its boundary only."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.enc(x.transpose(0, 1)).transpose(0, 1)


class _Gate(nn.Module):
    """A custom module with its own parameters: the generic fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.mix = nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x @ self.mix) * x * self.scale


class _ScaledLinear(nn.Linear):
    """A subclass with its own forward: the fallback, not the Linear rule."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, 2 * self.weight, self.bias)


class _Renamed(nn.Module):
    """A child's parameters registered again on the parent (Opacus' RenameParamsMixin)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(4, 4)
        self.register_parameter("l0_weight", self.cell.weight)
        self.register_parameter("l0_bias", self.cell.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.cell(x))


def _norm_with_random_affine(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    return norm


def _tokens(*shape: int, vocab: int = 6) -> Callable[[], Tensor]:
    def make() -> Tensor:
        idx = torch.randint(0, vocab, shape)
        idx[0, 0] = idx[0, 1] = 1  # a repeat within one sample
        idx[1, 0] = 0  # the padding index, where one is set
        return idx

    return make


Case = tuple[Callable[[], nn.Module], Callable[[], Any]]

CASES: dict[str, Case] = {
    "linear_2d": (lambda: _Head(nn.Linear(4, 3)), lambda: _randn(B, 4)),
    "linear_3d": (lambda: _Head(nn.Linear(4, 3)), lambda: _randn(B, 5, 4)),
    "linear_4d": (lambda: _Head(nn.Linear(4, 3)), lambda: _randn(B, 2, 3, 4)),
    "linear_nobias": (lambda: _Head(nn.Linear(4, 3, bias=False)), lambda: _randn(B, 5, 4)),
    "conv1d_stride_dilation": (
        lambda: _Head(nn.Conv1d(2, 4, 3, stride=2, dilation=2, padding=1)),
        lambda: _randn(B, 2, 9),
    ),
    "conv1d_groups_reflect": (
        lambda: _Head(nn.Conv1d(4, 4, 3, groups=2, padding=1, padding_mode="reflect")),
        lambda: _randn(B, 4, 6),
    ),
    "conv2d_same_circular": (
        lambda: _Head(nn.Conv2d(2, 3, 3, padding="same", padding_mode="circular")),
        lambda: _randn(B, 2, 4, 5),
    ),
    "conv2d_stride_groups_nobias": (
        lambda: _Head(nn.Conv2d(4, 6, (2, 3), stride=(2, 1), groups=2, bias=False)),
        lambda: _randn(B, 4, 5, 5),
    ),
    "conv2d_dilation_replicate": (
        lambda: _Head(nn.Conv2d(2, 2, 2, dilation=2, padding=1, padding_mode="replicate")),
        lambda: _randn(B, 2, 5, 4),
    ),
    "conv3d": (
        lambda: _Head(nn.Conv3d(2, 2, 2, stride=(1, 2, 1), padding=1)),
        lambda: _randn(B, 2, 3, 4, 3),
    ),
    "embedding": (lambda: _Head(nn.Embedding(6, 3)), _tokens(B, 4)),
    "embedding_padding_idx": (lambda: _Head(nn.Embedding(6, 3, padding_idx=0)), _tokens(B, 4)),
    "layernorm": (
        lambda: _Head(_norm_with_random_affine(nn.LayerNorm(4))),
        lambda: _randn(B, 5, 4),
    ),
    "layernorm_2d_shape": (
        lambda: _Head(_norm_with_random_affine(nn.LayerNorm((3, 4)))),
        lambda: _randn(B, 2, 3, 4),
    ),
    "groupnorm": (
        lambda: _Head(_norm_with_random_affine(nn.GroupNorm(2, 4))),
        lambda: _randn(B, 4, 5),
    ),
    "rmsnorm": (
        lambda: _Head(_norm_with_random_affine(nn.RMSNorm(4))),
        lambda: _randn(B, 5, 4),
    ),
    "instancenorm2d_training": (
        lambda: _Head(
            _norm_with_random_affine(nn.InstanceNorm2d(3, affine=True, track_running_stats=True))
        ),
        lambda: _randn(B, 3, 3, 4),
    ),
    "batchnorm2d_eval": (
        lambda: _Head(_norm_with_random_affine(nn.BatchNorm2d(3))).eval(),
        lambda: _randn(B, 3, 3, 3),
    ),
    "mha_batch_first": (lambda: _Attention(True, None), lambda: _randn(B, 4, 8)),
    "mha_seq_first": (lambda: _Attention(False, None), lambda: _randn(B, 4, 8)),
    "mha_batch_first_key_padding": (
        lambda: _Attention(True, "key_padding"),
        lambda: _randn(B, 4, 8),
    ),
    "mha_seq_first_causal": (lambda: _Attention(False, "causal"), lambda: _randn(B, 4, 8)),
    "mha_seq_first_key_padding": (
        lambda: _Attention(False, "key_padding"),
        lambda: _randn(B, 4, 8),
    ),
    "mha_replay_seq_first_key_padding_T_eq_B": (
        lambda: _Attention(False, "key_padding", bias_kv=True),
        lambda: _randn(B, B, 8),
    ),
    "mha_replay_batch_first_causal_T_eq_B": (
        lambda: _Attention(True, "causal", bias_kv=True),
        lambda: _randn(B, B, 8),
    ),
    "mha_replay_seq_first_causal": (
        lambda: _Attention(False, "causal", bias_kv=True),
        lambda: _randn(B, 4, 8),
    ),
    "encoder_layer_batch_first": (
        lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
        lambda: _randn(B, 4, 8),
    ),
    "encoder_layer_seq_first": (_SeqFirstEncoder, lambda: _randn(B, 4, 8)),
    "encoder_layer_seq_first_T_eq_B": (_SeqFirstEncoder, lambda: _randn(B, B, 8)),
    "fallback_custom": (lambda: _Gate(), lambda: _randn(B, 5, 4)),
    "subclass_own_forward": (lambda: _Head(_ScaledLinear(4, 3)), lambda: _randn(B, 5, 4)),
    "reregistered_parameters": (lambda: _Renamed(), lambda: _randn(B, 5, 4)),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_per_sample_oracle(case: str, reduction: str) -> None:
    torch.manual_seed(0)
    make_model, make_input = CASES[case]
    model = make_model().double()
    if case == "batchnorm2d_eval":
        model.eval()
    inputs = make_input()
    with torch.no_grad():
        target = torch.randn_like(model(inputs))
    with warnings.catch_warnings():
        # Any "left out" warning would be a failure of this matrix: every case must be exact.
        warnings.filterwarnings("error", message="lightning_gradwatch")
        assert_matches_oracle(model, inputs, target, squared_error, reduction)
