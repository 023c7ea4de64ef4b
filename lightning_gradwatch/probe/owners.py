"""Which module computes the statistics of which tracked parameter.

Each tracked parameter is owned by the modules whose rule accounts for its use: the module
that registers it directly (with its dedicated rule, or the generic fallback), a module whose
rule owns its children's parameters (``recursive``), or a parametrized layer for its
parametrizations' sources. A parameter registered again on an ancestor is owned by the
descendant that uses it; one shared by two unrelated modules is owned by both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .registry import Call, LayerRule, ParamStats, RuleContext, registered_base, rule_for
from .rules.fallback import FallbackRule
from .rules.parametrized import parametrized_rule

_FALLBACK = FallbackRule()


@dataclass
class _Owner:
    """A module whose rule computes statistics for some tracked parameters."""

    module: nn.Module
    module_name: str
    rule: LayerRule
    local_to_name: dict[str, str]  # local parameter name -> canonical name
    calls: list[Call] = field(default_factory=list)
    missing_grads: int = 0
    result: dict[str, ParamStats] | None = None
    skip_reason: str | None = None
    # The rule of the registered base class of a subclass that overrides ``forward`` (which
    # gets the fallback): its ``check`` still applies, e.g. batch statistics in BatchNorm.
    base_rule: LayerRule | None = None
    batch_dim: int = 0  # the dim of its inputs and outputs that indexes samples
    seen_shape: tuple[int, ...] | None = None  # first input's shape, for messages
    # Dims where the sample-dim check found the samples, when they contradict the dim the
    # rule reads them from itself (LayerRule.native_batch_dim).
    dim_conflict: list[int] | None = None
    # LayerRule.native_batch_dim of the module, asked once (it depends on the module's
    # configuration only, and a parametrized layer's answer builds a stand-in module).
    native_dim: int | None = None
    want: frozenset[str] = frozenset()  # RuleContext.want
    need_grad_sample: frozenset[str] = frozenset()  # RuleContext.need_grad_sample
    # The RuleContexts built so far, by what varies between steps (see _compute_calls).
    contexts: dict[tuple[Any, ...], RuleContext] = field(default_factory=dict)


def resolve_owners(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    effective: dict[str, tuple[nn.Module, str]],
) -> list[_Owner]:
    """The owners of ``params`` (canonical name to parameter) and of the reparametrized
    ``effective`` tensors (canonical name to ``(module, attribute)``), in module order."""
    canonical = {id(p): n for n, p in params.items()}
    owners: list[_Owner] = []
    claimed_by_recursive: set[int] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        if id(module) in claimed_by_recursive:
            continue
        # A module with parametrized tensors gets a rule that wraps its layer's own rule and
        # claims the parametrizations' submodules (see rules/parametrized.py).
        rule = parametrized_rule(module) or rule_for(module)
        base_rule = None
        if rule is None:
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            rule = _FALLBACK
            found = registered_base(module)
            base_rule = found[1] if found is not None else None
        if rule.recursive:
            claimed_by_recursive.update(id(m) for m in module.modules() if m is not module)
        local = {
            local_name: canonical[id(p)]
            for local_name, p in rule.owned_parameters(module).items()
            if id(p) in canonical
        }
        local.update({a: n for n, (m, a) in effective.items() if m is module})
        if local and not any(o.module is module for o in owners):
            owner = _Owner(module, module_name, rule, local, base_rule=base_rule)
            owner.native_dim = rule.native_batch_dim(module)
            owners.append(owner)
    return _drop_reregistered(owners)


def _drop_reregistered(owners: list[_Owner]) -> list[_Owner]:
    """Give a Parameter that a module registers again under a second name (Opacus'
    ``RenameParamsMixin``, ``self.w = self.child.weight``) to the descendant that owns it too.

    The descendant is the module whose forward uses it; the ancestor's registration is an alias,
    and counting both would add the ancestor's replay to the descendant's rule (double the
    gradient). Two modules where neither contains the other (genuine tying) both keep it.
    """
    descendants = {
        id(o.module): {id(m) for m in o.module.modules()} - {id(o.module)} for o in owners
    }
    kept: list[_Owner] = []
    for owner in owners:
        inner = descendants[id(owner.module)]
        aliases = {
            local
            for local, name in owner.local_to_name.items()
            if any(
                id(other.module) in inner and name in other.local_to_name.values()
                for other in owners
            )
        }
        if aliases:
            owner.local_to_name = {k: v for k, v in owner.local_to_name.items() if k not in aliases}
        if owner.local_to_name:
            kept.append(owner)
    return kept
