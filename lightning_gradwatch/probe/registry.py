"""Registry of per-layer rules.

A rule turns what a module saw in the forward pass (its inputs and outputs) and what autograd
handed back (the gradients of its outputs) into per-sample statistics of the module's
parameters. Two forms register one:

* the minimal one, a function returning per-sample gradients decorated with
  :func:`~lightning_gradwatch.probe.grad_sampler.register_grad_sampler` (the engine derives
  every statistic from them; an optional fast path for norms and inner products may be added
  with ``register_norm_sampler``);
* a :class:`LayerRule` subclass decorated with :func:`register_rule`, whose
  :meth:`LayerRule.compute` returns the statistics directly (the built-in layers, which avoid
  materialising per-sample gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .input_grad import InputGrad


@dataclass
class Call:
    """One forward call of a module, captured for the backward pass.

    ``args``/``kwargs`` are the detached forward inputs, ``outputs`` the detached output tensors
    (flattened), ``output_versions`` their version counters at capture time (an in-place op on
    an output after the forward bumps it), and ``grads`` the gradient autograd delivered for each
    output, ``None`` where none arrived (an output that does not reach the loss).
    ``consumed`` is set once a backward pass has used the call and the probe has dropped its
    tensors (``outputs`` is then empty). ``state`` is what the rule's :meth:`LayerRule.capture`
    returned for this call (``None`` for most rules).

    An output is ``None`` where the probe did not keep it: the rule's
    :meth:`LayerRule.input_grad_route` found where the backward forms the gradient at the
    call's input, which ``input_grad`` then holds (see ``input_grad.py``).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[Tensor | None]
    output_versions: list[int]
    grads: list[Tensor | None] = field(default_factory=list)
    consumed: bool = False
    state: Any = None
    input_grad: InputGrad | None = None
    #: The backward (autograd graph task id) in which the rule's :meth:`LayerRule.compute_early`
    #: used this call before all its outputs' gradients arrived; ``None`` otherwise.
    early_in_task: int | None = None

    def output_intact(self, k: int = 0) -> bool:
        """Whether output ``k`` was kept and still holds the values the module produced."""
        out = self.outputs[k]
        return out is not None and out._version == self.output_versions[k]


@dataclass
class ParamStats:
    """Per-sample statistics of one parameter for one backward pass.

    Attributes:
        dot: ``(B,)`` inner products ``<g_i, theta>``.
        sq_norm: ``(B,)`` squared norms ``|g_i|^2``.
        sum_sq: ``param.shape``, ``sum_i g_i**2``; ``None`` unless requested.
        grad_sample: ``(B, *param.shape)`` per-sample gradients; ``None`` unless requested
            (only for parameters shared between modules, whose contributions must be summed
            before taking norms).
        grad_sum: ``param.shape``, ``sum_i g_i`` formed from the same per-sample values as
            ``sum_sq`` (in ``ctx.dtype``); set whenever ``sum_sq`` is, unless
            ``ctx.need_grad_sum`` is ``False`` (the probe then uses autograd's own batch
            gradient, which is exact there). Autograd's gradient is not a substitute under
            16-bit precision: it is rounded to 16 bits, and the variance
            ``sum_sq/B - (grad_sum/B)**2`` cancels to that rounding error.
    """

    dot: Tensor
    sq_norm: Tensor
    sum_sq: Tensor | None = None
    grad_sample: Tensor | None = None
    grad_sum: Tensor | None = None


@dataclass(frozen=True)
class RuleContext:
    """What a rule needs besides the module and its calls.

    Rules work on the output gradients exactly as autograd delivers them, that is on
    ``c * loss_scale * dl_i/dz``; the probe rescales the results (``dot`` and ``grad_sample``
    by ``1/(c * loss_scale)``, squares by its square), which is cheaper than rescaling every
    backprop.

    Attributes:
        dtype: floating dtype for all statistics (at least float32).
        want: local parameter names (as in ``module.named_parameters``) to compute.
        need_sum_sq: compute ``sum_i g_i**2``.
        need_grad_sample: local names whose per-sample gradients must be materialised.
        chunk_elements: bound on the number of elements of any materialised per-sample tensor.
        batch_dim: the dimension of the module's tensor inputs and outputs that indexes samples
            (1 inside a sequence-first ``nn.Transformer*`` with ``batch_first=False``, or as
            declared with ``GradientProbe(batch_dims=...)``). The probe moves it to dim 0
            before calling a :attr:`LayerRule.positionwise` rule, so those see 0; other rules
            that cannot honour a non-zero value raise :class:`SkipModule`.
        need_grad_sum: form ``sum_i g_i`` along with ``sum_i g_i**2`` (only read when
            ``need_sum_sq``). ``False`` when the probe takes it from autograd's own batch
            gradient of the parameters instead, which is exactly that sum when parameters and
            backprops are float32/float64 and every use of the parameters is inside their
            owning modules; a rule may still return it (it is then used).
    """

    dtype: torch.dtype
    want: frozenset[str]
    need_sum_sq: bool
    need_grad_sample: frozenset[str]
    chunk_elements: int
    batch_dim: int = 0
    need_grad_sum: bool = True


class SkipModule(Exception):
    """Raised by a rule that cannot give exact statistics for this call; the probe excludes the
    module's parameters from the step and warns once with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LayerRule:
    """Base class for a per-layer rule.

    Subclasses implement :meth:`compute`. ``recursive = True`` makes the rule own the
    parameters of the module's children too (for modules whose forward uses its children's
    parameters directly, like ``nn.MultiheadAttention``'s ``out_proj``). ``positionwise = True``
    lets the probe hand it inputs whose sample dimension was elsewhere (see
    :attr:`RuleContext.batch_dim`); a rule with ``positionwise = False`` gets the calls as
    captured and must honour ``ctx.batch_dim`` itself or refuse a non-zero one.
    """

    recursive: bool = False
    #: The layer acts on each position of the leading dims independently (Linear, Embedding,
    #: LayerNorm, RMSNorm): the probe may move the sample dimension of its first argument,
    #: first output and their gradients to dim 0 before :meth:`compute`.
    positionwise: bool = False
    #: The rule implements :meth:`compute_early` (the probe asks it only then).
    computes_early: bool = False

    def native_batch_dim(self, module: nn.Module) -> int | None:
        """The dim of the module's first input along which the rule itself reads samples,
        for rules that find it from the module (``batch_first`` of a recurrent layer); the
        probe then hands the calls over as captured and only checks that its own evidence
        agrees. ``None`` (default): the probe decides (see :attr:`positionwise`)."""
        return None

    def owned_parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """Local name to parameter, for every trainable parameter this rule covers."""
        return {
            name: p
            for name, p in module.named_parameters(recurse=self.recursive)
            if p.requires_grad
        }

    def check(self, module: nn.Module) -> str | None:
        """Return a reason to exclude the module for this forward (e.g. BatchNorm in training
        mode), or ``None``. Called at forward time."""
        return None

    def capture(self, module: nn.Module) -> Any:
        """Module state the rule needs as it was during this forward call (e.g. the buffers
        of a weight parametrization, which the next forward may update). Called in the
        forward hook, right after :meth:`check`; the result becomes :attr:`Call.state`."""
        return None

    def input_grad_route(self, module: nn.Module, args: tuple, output: Tensor) -> InputGrad | None:
        """Where the backward forms the gradient at this call's input, for a rule that reads
        the call's output only to form ``<G_i, W>`` and can form it from that gradient
        instead (see ``input_grad.py``); the probe then does not keep the output. Called at
        forward time for a call with tensor arguments and one output. ``None`` (default):
        keep the output."""
        return None

    def output_needed(self, module: nn.Module, args: tuple) -> bool:
        """Whether :meth:`compute` will read this call's output, which the probe then keeps
        from the forward to the backward. Called at forward time for a call with tensor
        arguments and one output, where :meth:`input_grad_route` gave none. ``True``
        (default): keep it. A rule answering ``False`` must be exact without it:
        ``Call.outputs`` then holds ``None`` and :meth:`Call.output_intact` is ``False``."""
        return True

    def compute_early(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats] | None:
        """Per-sample statistics from the gradients that have arrived, called (with
        :attr:`computes_early`) when one output's gradient arrives while another's has not
        and may never (an output the loss does not use arrives at no point). Return them only
        where they are exact whether or not the missing gradients come later in this
        backward (they are then ignored); ``None``: wait, as for any rule, for the rest or the
        end of the backward. Called from the hook delivering the gradient, so the node being
        run is that output's ``grad_fn``."""
        return None

    def compute(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats]:
        """Per-sample statistics for ``ctx.want``, from all calls of one forward pass."""
        raise NotImplementedError


_RULES: dict[type[nn.Module], LayerRule] = {}

R = TypeVar("R", bound=type[LayerRule])


def register_rule(*module_types: type[nn.Module]) -> Callable[[R], R]:
    """Class decorator: use this rule for ``module_types`` and for their subclasses that keep
    the registered type's ``forward`` (see :func:`rule_for`)."""

    def decorate(rule_cls: R) -> R:
        rule = rule_cls()
        for module_type in module_types:
            add_rule(module_type, rule)
        return rule_cls

    return decorate


def add_rule(module_type: type[nn.Module], rule: LayerRule) -> None:
    """Use ``rule`` for ``module_type`` (what the decorators do), replacing any earlier one."""
    _RULES[module_type] = rule


def registered_rule(module_type: type[nn.Module]) -> LayerRule | None:
    """The rule registered for exactly ``module_type``, or ``None``."""
    return _RULES.get(module_type)


def registered_base(module: nn.Module) -> tuple[type[nn.Module], LayerRule] | None:
    """The most specific registered type in ``module``'s MRO and its rule, whether or not the
    module overrides that type's ``forward``."""
    for klass in type(module).__mro__:
        rule = _RULES.get(klass)
        if rule is not None:
            return klass, rule
    return None


def rule_for(module: nn.Module) -> LayerRule | None:
    """The dedicated rule for ``module``, or ``None`` (the probe then uses the generic fallback).

    A rule describes what its registered type's ``forward`` computes, so it applies to a module
    whose type is registered, or whose type inherits the registered type's ``forward``
    unchanged. A subclass with its own ``forward`` (e.g. a Linear that scales its weight) may
    compute anything: it gets no dedicated rule.
    """
    found = registered_base(module)
    if found is None:
        return None
    klass, rule = found
    if type(module) is not klass and type(module).forward is not klass.forward:
        return None
    return rule


def registered_types() -> list[type[nn.Module]]:
    """Module types with a dedicated rule."""
    return list(_RULES)
