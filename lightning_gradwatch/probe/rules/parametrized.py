"""Layers whose tensors are computed from other parameters: ``torch.nn.utils.parametrize``
(``parametrizations.weight_norm``, ``spectral_norm``, ``orthogonal``, user-defined
parametrizations) and the legacy hook-based ``torch.nn.utils.weight_norm`` and
``torch.nn.utils.spectral_norm``.

The layer (``nn.Linear``, ``nn.Conv2d``, ...) reads an *effective* tensor ``W = P(theta)``
computed from the trainable sources ``theta`` (``parametrizations.weight.original``, or
``original0``/``original1`` for weight_norm's ``g``/``v``; ``weight_g``/``weight_v`` or
``weight_orig`` for the legacy hooks). Sample ``i``'s gradient of a source is the chain

    ``g_i(theta) = J_P(theta)^T G_i``,

where ``G_i`` is sample ``i``'s gradient with respect to ``W``. The layer's own rule computes
``G_i`` (materialised, ``(B, *W.shape)``) from activations and backprops exactly as for an
unparametrized layer; ``J_P^T`` is applied with ``torch.func.vjp`` under ``torch.func.vmap``
over samples, in chunks.

Replaying ``P`` must give the very function the forward used, and must not change training:

- the state of ``P`` (its buffers: spectral norm's power-iteration vectors ``_u``/``_v``, the
  orthogonal map's ``base``) is copied in the forward hook, per call, and the replay reads
  the copies; nothing the replay does reaches the module's own buffers;
- spectral norm updates ``_u``/``_v`` by a power iteration under ``no_grad`` at every
  evaluation in training mode and then treats them as constants: the replay skips that
  update (evaluation mode), with the vectors the forward ended with, which is the function
  autograd differentiated;
- the replay runs under the autocast state of the forward;
- a parametrization that draws random numbers cannot be replayed: the first replay of each
  parametrization runs with the random number generators forked and refuses one that uses
  them.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _LegacyWeightNorm
from torch.utils._python_dispatch import TorchDispatchMode

from .._linalg import chunk_size, row_sq_norm
from ..registry import Call, LayerRule, ParamStats, RuleContext, SkipModule, rule_for

#: Parametrized tensors whose replay was checked not to draw random numbers.
_RNG_CHECKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass(frozen=True)
class _Reparam:
    """One effective tensor of a layer and how to recompute it.

    Attributes:
        name: the attribute the layer's forward reads (``"weight"``).
        sources: local names (relative to the layer) of the tensors ``P`` takes, in order.
        what: a description for messages, e.g. ``"parametrizations.weight (_SpectralNorm)"``.
        capture: returns the state of ``P`` as of now (called in the forward hook).
        replay: ``(state, sources) -> W``, with no side effect on the module.
    """

    name: str
    sources: tuple[str, ...]
    what: str
    capture: Callable[[], Any]
    replay: Callable[[Any, tuple[Tensor, ...]], Tensor]
    owner: nn.Module  # the object whose replay is RNG-checked once


@dataclass
class _Captured:
    """State of every reparametrized tensor of one forward call."""

    states: dict[str, Any]
    autocast: list[tuple[str, torch.dtype]]


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    return [
        (device, torch.get_autocast_dtype(device))
        for device in ("cpu", "cuda")
        if torch.is_autocast_enabled(device)
    ]


@contextmanager
def _autocast(state: list[tuple[str, torch.dtype]]) -> Iterator[None]:
    """Autocast exactly as during the forward: enabled with its dtype for the devices listed
    in ``state``, disabled for the others."""
    enabled = dict(state)
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    with ExitStack() as stack:
        for device in devices:
            dtype = enabled.get(device, torch.get_autocast_dtype(device))
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=device in enabled))
        yield


def _buffers(module: nn.Module) -> dict[str, Tensor]:
    return {name: b.detach().clone() for name, b in module.named_buffers()}


def _parametrize_reparams(module: nn.Module) -> list[_Reparam]:
    """One :class:`_Reparam` per tensor registered with ``parametrize.register_parametrization``."""
    reparams = []
    for tensor_name, plist in module.parametrizations.items():  # type: ignore[union-attr]
        assert isinstance(plist, parametrize.ParametrizationList)
        # The originals, and any parameter of the parametrization modules themselves (a
        # learnable scale, ...). An original registered as a buffer, or a frozen parameter,
        # is a constant: part of the state.
        trainable = [n for n, p in plist.named_parameters() if p.requires_grad]
        kinds = ", ".join(type(m).__name__ for m in plist)

        def capture(plist: nn.Module = plist, trainable: list[str] = trainable) -> Any:
            # Buffers may change at the next evaluation (spectral norm's vectors): copied.
            # Frozen parameters do not change before the backward: referenced.
            state = _buffers(plist)
            state.update({n: t.detach() for n, t in plist.named_parameters() if n not in trainable})
            return state

        def replay(
            state: dict[str, Tensor],
            sources: tuple[Tensor, ...],
            plist: nn.Module = plist,
            trainable: list[str] = trainable,
        ) -> Tensor:
            dtype = sources[0].dtype if sources else None
            tensors = {
                n: t.to(dtype) if dtype is not None and t.is_floating_point() else t
                for n, t in state.items()
            }
            tensors.update(zip(trainable, sources, strict=True))
            # Spectral norm's power iteration is an in-place update under no_grad that the
            # forward's graph does not differentiate: replay without it, with the vectors the
            # forward ended with (in `state`).
            power = [m for m in plist.modules() if isinstance(m, _SpectralNorm) and m.training]
            for m in power:
                m.training = False
            try:
                return functional_call(plist, tensors, (), tie_weights=False, strict=False)
            finally:
                for m in power:
                    m.training = True

        reparams.append(
            _Reparam(
                name=tensor_name,
                sources=tuple(f"parametrizations.{tensor_name}.{n}" for n in trainable),
                what=f"parametrizations.{tensor_name} ({kinds})",
                capture=capture,
                replay=replay,
                owner=plist,
            )
        )
    return reparams


def _legacy_reparams(module: nn.Module) -> list[_Reparam]:
    """The tensors computed by the legacy ``weight_norm``/``spectral_norm`` forward pre-hooks."""
    reparams = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _LegacyWeightNorm):
            name, dim = hook.name, hook.dim

            def wn_replay(state: Any, sources: tuple[Tensor, ...], dim: int = dim) -> Tensor:
                g, v = sources
                return torch._weight_norm(v, g, dim)

            reparams.append(
                _Reparam(
                    name=name,
                    sources=(f"{name}_g", f"{name}_v"),
                    what="torch.nn.utils.weight_norm",
                    capture=lambda: None,
                    replay=wn_replay,
                    owner=module,
                )
            )
        elif isinstance(hook, _LegacySpectralNorm):
            sn, name = hook, hook.name

            def sn_capture(module: nn.Module = module, name: str = name) -> Any:
                # The pre-hook already ran its power iteration for this forward: these are
                # the vectors the forward's sigma used.
                return (
                    getattr(module, f"{name}_u").detach().clone(),
                    getattr(module, f"{name}_v").detach().clone(),
                )

            def sn_replay(
                state: tuple[Tensor, Tensor],
                sources: tuple[Tensor, ...],
                sn: _LegacySpectralNorm = sn,
            ) -> Tensor:
                (weight,) = sources
                u, v = (t.to(weight.dtype) for t in state)
                sigma = torch.dot(u, torch.mv(sn.reshape_weight_to_matrix(weight), v))
                return weight / sigma

            reparams.append(
                _Reparam(
                    name=name,
                    sources=(f"{name}_orig",),
                    what="torch.nn.utils.spectral_norm",
                    capture=sn_capture,
                    replay=sn_replay,
                    owner=module,
                )
            )
    return reparams


def _is_legacy(module: nn.Module) -> bool:
    return any(
        isinstance(h, (_LegacyWeightNorm, _LegacySpectralNorm))
        for h in module._forward_pre_hooks.values()
    )


def _base_type(module: nn.Module) -> type[nn.Module]:
    return parametrize.type_before_parametrizations(module)


class _SeededOpDetector(TorchDispatchMode):
    """Records whether any operator that draws from a random number generator ran."""

    def __init__(self) -> None:
        super().__init__()
        self.seeded: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.seeded.append(str(func))
        return func(*args, **(kwargs or {}))


class ParametrizedRule(LayerRule):
    """Rule for a layer with parametrized tensors (or legacy weight/spectral-norm hooks).

    Owns the layer's direct parameters and the parametrizations' sources (``recursive``: the
    ``ParametrizationList`` modules are never owners of their own, so their output, the
    effective weight, is never taken for a batch). Wraps the rule of the layer's type
    (:func:`~lightning_gradwatch.probe.registry.rule_for` on the unparametrized class).
    """

    recursive = True

    def reparams(self, module: nn.Module) -> list[_Reparam]:
        if parametrize.is_parametrized(module):
            return _parametrize_reparams(module)
        return _legacy_reparams(module)

    def base_rule(self, module: nn.Module) -> LayerRule | None:
        """The rule of the layer itself, or ``None`` when it has no dedicated one."""
        base = _base_type(module)
        # rule_for reads the type only: a bare instance of it will do (no attribute copies).
        rule = rule_for(base.__new__(base))
        if rule is None or rule.recursive or not _is_reparametrized(module):
            return None
        others = [n for n in module._modules if n != "parametrizations"]
        return None if others else rule

    def native_batch_dim(self, module: nn.Module) -> int | None:
        base_rule = self.base_rule(module)
        if base_rule is None:
            return None
        return base_rule.native_batch_dim(_stand_in(module, _base_type(module), {}))

    def check(self, module: nn.Module) -> str | None:
        base_rule = self.base_rule(module)
        if base_rule is not None and _is_reparametrized(module):
            if type(base_rule).check is LayerRule.check:
                return None  # no refusal to ask for: skip building a stand-in every forward
            return base_rule.check(_stand_in(module, _base_type(module), {}))
        whats = ", ".join(
            f"'{name}{'.' if name else ''}{r.name}' by {r.what}"
            for name, m in module.named_modules()
            if _is_reparametrized(m)
            for r in self.reparams(m)
        )
        return (
            f"its tensors are reparametrized ({whats}), and the chain through a "
            f"parametrization is formed only for a layer whose own dedicated rule gives the "
            f"per-sample gradient of the effective tensor (nn.Linear, nn.Conv1d/2d/3d, "
            f"nn.Embedding, ...), not inside a {_base_type(module).__name__}; leave its "
            f"parameters out of params, or apply the parametrization to such a layer"
        )

    def capture(self, module: nn.Module) -> _Captured:
        return _Captured(
            states={r.name: r.capture() for r in self.reparams(module)},
            autocast=_autocast_state(),
        )

    def compute(
        self, module: nn.Module, calls: list[Call], ctx: RuleContext
    ) -> dict[str, ParamStats]:
        base_rule = self.base_rule(module)
        assert base_rule is not None  # check() excluded the module otherwise
        reparams = self.reparams(module)
        owned = self.owned_parameters(module)
        direct = [
            n for n in ctx.want if not any(n in r.sources for r in reparams)
        ]  # the layer's own parameters (e.g. an unparametrized bias)
        reparams_wanted = [r for r in reparams if any(s in ctx.want for s in r.sources)]
        tracked_effective = [r.name for r in reparams if r.name in ctx.want]
        if tracked_effective and len(calls) > 1:
            raise SkipModule(
                f"the effective {tracked_effective} is tracked and the layer ran {len(calls)} "
                f"times in one forward: its effective tensor may differ between the calls "
                f"(spectral norm updates it at every call), so the per-sample gradient of the "
                f"effective tensor is not defined; track the sources instead "
                f"({[s for r in reparams if r.name in tracked_effective for s in r.sources]})"
            )
        base_ctx = RuleContext(
            dtype=ctx.dtype,
            want=frozenset(direct) | {r.name for r in reparams_wanted},
            need_sum_sq=ctx.need_sum_sq,
            # Several calls in one forward may see different effective tensors (spectral
            # norm updates its vectors at each evaluation): each call is pulled back on its
            # own and the per-sample gradients are summed before any norm is taken.
            need_grad_sample=frozenset(direct if len(calls) > 1 else ctx.need_grad_sample)
            | {r.name for r in reparams_wanted},
            chunk_elements=ctx.chunk_elements,
        )
        sources = {n: p.detach().to(ctx.dtype) for n, p in owned.items()}
        totals: dict[str, Tensor] = {}
        single: dict[str, ParamStats] = {}
        for call in calls:
            state: _Captured = call.state
            effective: dict[str, Tensor] = {}
            pullbacks: dict[str, Callable[..., tuple[Tensor, ...]]] = {}
            with _autocast(state.autocast):
                for r in reparams:
                    args = tuple(sources[s] for s in r.sources)
                    self._check_rng(r, state.states[r.name], args)
                    if r in reparams_wanted:
                        out, pullbacks[r.name] = vjp(
                            lambda *a, r=r, s=state.states[r.name]: r.replay(s, a), *args
                        )
                    else:
                        with torch.no_grad():
                            out = r.replay(state.states[r.name], args)
                    effective[r.name] = out.detach().to(ctx.dtype)
            stand_in = _stand_in(module, _base_type(module), effective)
            result = base_rule.compute(stand_in, [call], base_ctx)
            for r in reparams_wanted:
                if r.name not in result:
                    continue
                grad_effective = result[r.name].grad_sample
                if grad_effective is None:
                    raise RuntimeError(
                        f"{type(base_rule).__name__} did not return per-sample gradients of "
                        f"'{r.name}' although asked (need_grad_sample)"
                    )
                pulled = _pull_back(pullbacks[r.name], grad_effective, ctx.chunk_elements)
                for source, g in zip(r.sources, pulled, strict=True):
                    if source in ctx.want:
                        totals[source] = totals[source] + g if source in totals else g
            for name in direct:
                if name not in result:
                    continue
                if len(calls) == 1:
                    single[name] = result[name]
                    if name not in ctx.need_grad_sample:
                        single[name].grad_sample = None
                else:
                    g = result[name].grad_sample
                    assert g is not None
                    totals[name] = totals[name] + g if name in totals else g
        out = dict(single)
        for name, grad_sample in totals.items():
            # Flattened per sample here, as a source may be 0-d (weight_norm(dim=None)'s g).
            flat = grad_sample.reshape(grad_sample.shape[0], -1)
            out[name] = ParamStats(
                dot=flat @ sources[name].reshape(-1),
                sq_norm=row_sq_norm(flat),
                sum_sq=grad_sample.pow(2).sum(0) if ctx.need_sum_sq else None,
                grad_sample=grad_sample if name in ctx.need_grad_sample else None,
                # From the same per-sample terms (see ParamStats.grad_sum), unless the probe
                # takes autograd's exact batch gradient.
                grad_sum=grad_sample.sum(0) if ctx.need_sum_sq and ctx.need_grad_sum else None,
            )
        return out

    @staticmethod
    def _check_rng(reparam: _Reparam, state: Any, args: tuple[Tensor, ...]) -> None:
        """Refuse, once per parametrization, one whose evaluation draws random numbers: its
        replay could not reproduce the forward's effective tensor. The check itself runs with
        the generators forked, so it consumes nothing."""
        if reparam.owner in _RNG_CHECKED:
            return
        devices = [a.device for a in args if a.device.type == "cuda"]
        detector = _SeededOpDetector()
        with torch.random.fork_rng(devices=devices[:1]), torch.no_grad(), detector:
            reparam.replay(state, args)
        if detector.seeded:
            raise SkipModule(
                f"its effective '{reparam.name}' ({reparam.what}) draws random numbers "
                f"({', '.join(sorted(set(detector.seeded)))}), so a replay cannot reproduce "
                f"the forward's value; leave {list(reparam.sources)} out of params, or make "
                f"the parametrization deterministic"
            )
        _RNG_CHECKED.add(reparam.owner)


_CPU_PULLBACK_ELEMENTS = 2**20


def _pull_back(
    pullback: Callable[..., tuple[Tensor, ...]], grad_effective: Tensor, budget: int
) -> list[Tensor]:
    """``J_P^T G_i`` for every sample: ``grad_effective`` ``(B, *W.shape)`` to one
    ``(B, *source.shape)`` tensor per source, ``vmap`` over chunks of samples."""
    batch = grad_effective.shape[0]
    if grad_effective.device.type == "cpu":
        # The backward of a parametrization is a few elementwise passes over the chunk: on a
        # CPU, chunks that stay in cache ran 1.5-2.5x faster than one chunk of the whole
        # batch (spectral/weight norm, 256x256 weight, 128 samples, one thread).
        budget = min(budget, _CPU_PULLBACK_ELEMENTS)
    step = chunk_size(batch, grad_effective[0].numel(), budget)
    pieces: list[tuple[Tensor, ...]] = []
    with warnings.catch_warnings():
        # Operators without a batching rule (weight_norm's backward, tril_) fall back to a
        # loop over samples inside vmap: slower, equally exact.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        for lo in range(0, batch, step):
            pieces.append(vmap(pullback)(grad_effective[lo : lo + step]))
    return [torch.cat([p[k] for p in pieces]) for k in range(len(pieces[0]))]


def _stand_in(module: nn.Module, base: type[nn.Module], effective: dict[str, Tensor]) -> nn.Module:
    """An instance of the layer's unparametrized class sharing the module's attributes, whose
    reparametrized tensors read ``effective`` (plain attributes), so that the layer's rule
    reads the replayed effective weight instead of evaluating the parametrization (which,
    for spectral norm in training mode, would run a power-iteration step)."""
    stand_in = base.__new__(base)
    attributes = dict(module.__dict__)
    attributes["_modules"] = {k: v for k, v in module._modules.items() if k != "parametrizations"}
    attributes["_parameters"] = dict(module._parameters)
    attributes["_forward_pre_hooks"] = {}
    stand_in.__dict__.update(attributes)
    for name, tensor in effective.items():
        stand_in.__dict__.pop(name, None)
        stand_in._parameters.pop(name, None)
        stand_in.__dict__[name] = tensor
    return stand_in


_RULE = ParametrizedRule()


def parametrized_rule(module: nn.Module) -> LayerRule | None:
    """The rule for a module with parametrized tensors or legacy weight/spectral-norm hooks,
    ``None`` for any other module."""
    if _is_reparametrized(module):
        return _RULE
    # A rule that owns its children's parameters (nn.MultiheadAttention's out_proj) would
    # read a reparametrized child's weight as a plain one: the module is refused instead.
    rule = rule_for(module)
    if rule is not None and rule.recursive and any(map(_is_reparametrized, module.modules())):
        return _RULE
    return None


def _is_reparametrized(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module) or _is_legacy(module)


def reparametrized_tensors(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    """Every tensor of ``model`` computed from other parameters (by ``parametrize`` or the
    legacy weight/spectral-norm hooks), without evaluating any parametrization.

    Returns:
        ``{"<module>.<tensor>": (description, [trainable source names])}`` with names as in
        ``model.named_parameters()``, e.g. ``{"fc.weight": ("parametrizations.weight
        (_SpectralNorm)", ["fc.parametrizations.weight.original"])}``.
    """
    found: dict[str, tuple[str, list[str]]] = {}
    for module_name, module in model.named_modules():
        if parametrized_rule(module) is None:
            continue
        prefix = f"{module_name}." if module_name else ""
        for r in _RULE.reparams(module):
            found[prefix + r.name] = (r.what, [prefix + s for s in r.sources])
    return found


def effective_tensor(module: nn.Module, tensor_name: str) -> Tensor:
    """``module.<tensor_name>`` computed from its sources with the parametrization's current
    state, detached, with no side effect: unlike reading the attribute, this runs no
    power-iteration step of spectral norm (the vectors of the latest forward are used) and
    changes no buffer.

    Raises:
        KeyError: ``tensor_name`` is not reparametrized in ``module``.
    """
    for r in _RULE.reparams(module) if parametrized_rule(module) is not None else []:
        if r.name == tensor_name:
            params = dict(module.named_parameters())
            with torch.no_grad():
                return r.replay(r.capture(), tuple(params[s].detach() for s in r.sources))
    raise KeyError(f"'{tensor_name}' of {type(module).__name__} is not reparametrized")
