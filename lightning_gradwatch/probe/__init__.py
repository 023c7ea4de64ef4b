"""The hook engine: :class:`GradientProbe` and its per-layer rules."""

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
    "register_rule",
]
