"""The hook engine: :class:`GradientProbe` and its per-layer rules."""

from .grad_sampler import register_grad_sampler, register_norm_sampler
from .probe import GradientProbe, ParameterUseError
from .registry import Call, LayerRule, ParamStats, RuleContext, SkipModule, register_rule
from .stats import ProbeStats

__all__ = [
    "Call",
    "GradientProbe",
    "LayerRule",
    "ParamStats",
    "ParameterUseError",
    "ProbeStats",
    "RuleContext",
    "SkipModule",
    "register_grad_sampler",
    "register_norm_sampler",
    "register_rule",
]
