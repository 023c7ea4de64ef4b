"""Which weights GWA scores: the classifier head, found in the first training forward pass
with global module hooks, and the weight lists of the other modes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .._lightning import runs_redirected_training_step
from ..probe.rules.parametrized import reparametrized_tensors


def is_bias(name: str) -> bool:
    """Whether a ``named_parameters()`` name is a module's ``bias``."""
    return name.rsplit(".", 1)[-1] == "bias"


def head_candidates(pl_module: nn.Module) -> list[str]:
    """Weight names of every trainable ``nn.Linear`` in module order, the possible heads.

    A reparametrized head (spectral_norm, weight_norm, ...) is scored on its effective weight,
    the one the layer multiplies by. Its trainability is read from its sources: reading the
    weight itself would run a spectral-norm power-iteration step.
    """
    reparametrized = reparametrized_tensors(pl_module)
    return [
        weight_name
        for name, module in pl_module.named_modules()
        if isinstance(module, nn.Linear)
        for weight_name in [f"{name}.weight" if name else "weight"]
        if (
            bool(reparametrized[weight_name][1])
            if weight_name in reparametrized
            else module.weight.requires_grad
        )
    ]


def effective_in_place_of_sources(
    names: list[str], reparametrized: dict[str, tuple[str, list[str]]]
) -> list[str]:
    """``names`` with the sources of each reparametrized tensor replaced by the tensor itself
    (``fc.parametrizations.weight.original`` -> ``fc.weight``), as in head mode: the cosine
    against a source is another quantity (identically 0 for a scale-invariant
    parametrization such as spectral_norm). Sources of a reparametrized bias are dropped."""
    replaced_by = {
        source: None if (name == "bias" or name.endswith(".bias")) else name
        for name, (_, sources) in reparametrized.items()
        for source in sources
    }
    kept = [replaced_by.get(n, n) for n in names]
    return list(dict.fromkeys(n for n in kept if n is not None))


class HeadDetector:
    """Watches one training forward pass to find the head: the last ``nn.Linear`` (among the
    candidates) whose output tensor is, unchanged, an output of an outermost module call of
    the LightningModule's tree (the model output handed to the loss).

    Outputs of a model (a container such as the LightningModule's ``forward`` or an
    ``nn.Sequential``) are preferred to a bare ``nn.Linear`` called directly from
    ``training_step`` (e.g. an auxiliary probe); the latter is the head only when no model
    output is a Linear output.

    Under a wrapping strategy (DDP, ``ddp_spawn``) Lightning runs ``training_step`` as a call
    of the LightningModule itself (its ``forward`` temporarily patched on the instance to
    ``training_step``), so the outermost call returns the loss. With ``redirected=True`` that
    call is transparent: the calls it makes are the outermost ones, as without a wrapper.

    The hooks are global (every module call in the process), because the head's output must
    be compared with the outputs of the outermost calls, whichever modules make them; they are
    removed by :meth:`finish`.
    """

    def __init__(self, pl_module: nn.Module, candidates: set[str], redirected: bool) -> None:
        self.root = pl_module
        self.redirected = redirected
        # One entry per open call of a watched module: whether it counts as a nesting level.
        self.counted: list[bool] = []
        self.names = {id(m): n for n, m in pl_module.named_modules()}
        self.candidate_modules = {
            id(m): f"{n}.weight" if n else "weight"
            for n, m in pl_module.named_modules()
            if isinstance(m, nn.Linear) and (f"{n}.weight" if n else "weight") in candidates
        }
        self.depth = 0
        self.linear_outputs: list[tuple[str, Tensor]] = []
        self.model_outputs: list[Tensor] = []
        self.bare_outputs: list[Tensor] = []
        module_hooks = torch.nn.modules.module
        self.handles = [
            module_hooks.register_module_forward_pre_hook(self._pre),
            module_hooks.register_module_forward_hook(self._post),
        ]

    def _is_redirected_step(self, module: nn.Module) -> bool:
        """The wrapper's call of the LightningModule that runs ``training_step``."""
        return (
            self.redirected
            and module is self.root
            and self.depth == 0
            and runs_redirected_training_step(module)
        )

    def _pre(self, module: nn.Module, args: Any) -> None:
        if id(module) not in self.names:
            return
        counted = not self._is_redirected_step(module)
        self.counted.append(counted)
        self.depth += counted

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if id(module) not in self.names or not self.counted:
            return
        if not self.counted.pop():
            return
        self.depth -= 1
        tensors = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor)]
        name = self.candidate_modules.get(id(module))
        if name is not None and len(tensors) == 1:
            self.linear_outputs.append((name, tensors[0]))
        if self.depth == 0:
            bare = isinstance(module, nn.Linear)
            (self.bare_outputs if bare else self.model_outputs).extend(tensors)

    def finish(self) -> str | None:
        """Remove the hooks; the head's weight name, or ``None`` when no candidate's output
        was a model output."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        found: list[str] = []
        for outputs in (self.model_outputs, self.bare_outputs):
            top = {id(t) for t in outputs}
            found = [name for name, out in self.linear_outputs if id(out) in top]
            if found:
                break
        self.linear_outputs, self.model_outputs, self.bare_outputs = [], [], []
        return found[-1] if found else None
