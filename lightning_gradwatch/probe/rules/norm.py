"""Affine parameters of LayerNorm, GroupNorm, RMSNorm, InstanceNorm and eval-mode BatchNorm.

Their per-sample gradients are small (``(B, C)`` or ``(B, *normalized_shape)``), so the rule
forms them directly: ``G_i = sum_t delta_it * xhat_it`` for the weight and
``sum_t delta_it`` for the bias, with ``xhat`` recomputed from the captured input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._linalg import require_one_batch, stats_from_grad_sample
from ..call_edges import current_node
from ..registry import Call, LayerRule, ParamStats, RuleContext, SkipModule, register_rule


class _AffineNormRule(LayerRule):
    """Shared logic: subclasses give ``xhat`` and the dims that belong to one parameter entry."""

    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def saved_normalised(self, module: nn.Module, x: Tensor) -> Tensor | None:
        """``xhat`` from the statistics the forward saved for its backward, when the node being
        run (the call's output's ``grad_fn``) has them for exactly ``x``; ``None`` (recompute
        with :meth:`normalise`) by default."""
        return None

    def reduce_dims(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        """Dims of ``(B, ...)`` summed to get a per-sample gradient of the parameter's shape."""
        raise NotImplementedError

    def compute(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats]:
        weight_grads, bias_grads = [], []
        require_one_batch(calls)
        for call in calls:
            x, grad = call.args[0], call.grads[0]
            if grad is None:
                continue
            x = x.detach().to(ctx.dtype)
            dims = self.reduce_dims(module, x)
            delta = grad.to(ctx.dtype)
            if "weight" in ctx.want:
                xhat = self.saved_normalised(module, x) if len(calls) == 1 else None
                if xhat is None:
                    xhat = self.normalise(module, x)
                weight_grads.append((delta * xhat).sum(dims) if dims else delta * xhat)
            if "bias" in ctx.want:
                bias_grads.append(delta.sum(dims) if dims else delta)
        out: dict[str, ParamStats] = {}
        for name, grads in (("weight", weight_grads), ("bias", bias_grads)):
            if not grads:
                continue
            param = getattr(module, name).detach().to(ctx.dtype)
            grad_sample = torch.stack(grads).sum(0).reshape(-1, *param.shape)
            out[name] = stats_from_grad_sample(
                grad_sample, param, ctx.need_sum_sq, name in ctx.need_grad_sample
            )
        return out


def _trailing_dims(x: Tensor, n_trailing: int) -> tuple[int, ...]:
    if x.dim() <= n_trailing:
        raise SkipModule("input has no sample dimension in front of the normalised shape")
    return tuple(range(1, x.dim() - n_trailing))


@register_rule(nn.LayerNorm)
class LayerNormRule(_AffineNormRule):
    positionwise = True

    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        assert isinstance(module, nn.LayerNorm)
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def saved_normalised(self, module: nn.Module, x: Tensor) -> Tensor | None:
        """``(x - mean) * rstd`` with the mean and reciprocal deviation the layer-norm kernel
        saved, which is how its backward forms ``xhat``: one elementwise pass instead of a
        second normalisation (four times as long on a CPU)."""
        node = current_node()
        if node is None or node.name() != "NativeLayerNormBackward0":
            return None
        try:  # freed by an earlier backward through a kept graph
            saved, mean, rstd = node._saved_input, node._saved_result1, node._saved_result2
        except RuntimeError:
            return None
        if not (
            isinstance(saved, Tensor)
            and saved.data_ptr() == x.data_ptr()
            and saved.shape == x.shape
            and saved.stride() == x.stride()
            and saved.dtype == x.dtype  # not a cast copy (autocast): those statistics differ
            and isinstance(mean, Tensor)
            and isinstance(rstd, Tensor)
            and mean.shape == rstd.shape
            and mean.dim() == x.dim()
        ):
            return None  # not this call's own normalisation: recompute
        return (x - mean.to(x.dtype)) * rstd.to(x.dtype)

    def reduce_dims(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        assert isinstance(module, nn.LayerNorm)
        return _trailing_dims(x, len(module.normalized_shape))


@register_rule(nn.RMSNorm)
class RMSNormRule(_AffineNormRule):
    positionwise = True

    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        assert isinstance(module, nn.RMSNorm)
        return F.rms_norm(x, module.normalized_shape, None, module.eps)

    def reduce_dims(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        assert isinstance(module, nn.RMSNorm)
        return _trailing_dims(x, len(module.normalized_shape))


class _ChannelNormRule(_AffineNormRule):
    """Norms with a per-channel parameter over ``(B, C, *spatial)``."""

    def reduce_dims(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        if x.dim() < 2:
            raise SkipModule("input has no sample dimension")
        return tuple(range(2, x.dim()))


@register_rule(nn.GroupNorm)
class GroupNormRule(_ChannelNormRule):
    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        assert isinstance(module, nn.GroupNorm)
        return F.group_norm(x, module.num_groups, None, None, module.eps)


@register_rule(nn.modules.instancenorm._InstanceNorm)
class InstanceNormRule(_ChannelNormRule):
    """InstanceNorm normalises each sample with its own statistics (in training mode, or
    without running statistics) or with the running statistics: a per-sample map either way,
    so its affine parameters are exact in training mode too. The running statistics are read,
    never updated."""

    def reduce_dims(self, module: nn.Module, x: Tensor) -> tuple[int, ...]:
        assert isinstance(module, nn.modules.instancenorm._InstanceNorm)
        if x.dim() != module._get_no_batch_dim() + 1:
            raise SkipModule("unbatched input has no sample dimension")
        return tuple(range(2, x.dim()))

    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        assert isinstance(module, nn.modules.instancenorm._InstanceNorm)
        if module.training or not module.track_running_stats:
            return F.instance_norm(x, None, None, None, None, True, 0.0, module.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.to(x.dtype).view(shape)
        var = module.running_var.to(x.dtype).view(shape)
        return (x - mean) * torch.rsqrt(var + module.eps)


@register_rule(nn.modules.batchnorm._BatchNorm)
class BatchNormRule(_ChannelNormRule):
    """Eval-mode BatchNorm with running statistics is a per-sample affine map; with batch
    statistics (training mode, or ``track_running_stats=False`` in any mode) it mixes samples."""

    def check(self, module: nn.Module) -> str | None:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        if module.training or module.running_mean is None:
            when = (
                "in training mode"
                if module.training
                else "in eval mode too, because it has no running statistics "
                "(track_running_stats=False)"
            )
            return (
                f"BatchNorm normalises with batch statistics {when}, so a sample's gradient "
                f"depends on the whole batch and per-sample gradients are not defined. Its "
                f"parameters are left out of per-sample statistics; layers before it see each "
                f"sample's share of the batch backprop, an approximation"
            )
        return None

    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.to(x.dtype).view(shape)
        var = module.running_var.to(x.dtype).view(shape)
        return (x - mean) * torch.rsqrt(var + module.eps)
