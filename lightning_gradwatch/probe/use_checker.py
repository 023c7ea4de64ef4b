"""The one-time check that every use of a tracked parameter is one a rule accounts for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

if TYPE_CHECKING:
    from .probe import GradientProbe


class ParameterUseError(RuntimeError):
    """A tracked parameter is used in a way the probe cannot attribute to samples exactly."""


class _UseChecker(TorchFunctionMode):
    """Watches one forward pass for uses of tracked parameters that no rule accounts for.

    A use counts when a torch function takes the parameter and returns a tensor in the graph.
    It is accounted for when a module that owns the parameter is executing (on the module
    stack). A use inside another module's forward is refused; a use outside every module's
    forward (e.g. a weight penalty added to the loss) is not part of any sample's loss and is
    left out, with a warning.
    """

    def __init__(self, probe: GradientProbe) -> None:
        super().__init__()
        self.probe = probe
        self.by_id = {id(p): n for n, p in probe._params.items()}
        self.owners_of: dict[str, set[int]] = {}
        for owner in probe._owners:
            for name in owner.local_to_name.values():
                self.owners_of.setdefault(name, set()).add(id(owner.module))
        self.stack: list[nn.Module] = []
        self.parametrizations = {
            id(m)
            for plist in probe.model.modules()
            if isinstance(plist, parametrize.ParametrizationList)
            for m in plist.modules()
        }
        self.names = {id(m): n for n, m in probe.model.named_modules(remove_duplicate=False)}
        pre = torch.nn.modules.module.register_module_forward_pre_hook(self._push)
        post = torch.nn.modules.module.register_module_forward_hook(self._pop)
        self._module_hooks = [pre, post]
        self.__enter__()

    def _push(self, module: nn.Module, args: Any) -> None:
        self.stack.append(module)

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def remove(self) -> None:
        for handle in self._module_hooks:
            handle.remove()
        self.__exit__(None, None, None)

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        probe = self.probe
        done = probe.verify == "first" and probe._verified
        if done or probe._finalize_queued or probe._replaying or not torch.is_grad_enabled():
            return result
        used = [
            self.by_id[id(x)]
            for x in tree_flatten((args, kwargs))[0]
            if isinstance(x, Tensor) and id(x) in self.by_id
        ]
        if not used or not any(
            isinstance(r, Tensor) and r.grad_fn is not None for r in tree_flatten(result)[0]
        ):
            return result
        # Evaluating a parametrization (reading `fc.weight`) pushes its own modules: the use
        # belongs to whichever module read the weight, below them on the stack.
        stack = [m for m in self.stack if id(m) not in self.parametrizations]
        on_stack = {id(m) for m in stack}
        for name in used:
            if self.owners_of.get(name, set()) & on_stack:
                continue
            if not stack:
                # Autograd's batch gradient of it now holds a part no sample's loss has.
                self.probe._outside_uses.add(name)
                key = f"outside:{name}"
                if key not in self.probe._warned:
                    self.probe._warned.add(key)
                    rank_zero_warn(
                        f"lightning_gradwatch: parameter '{name}' is used outside any module's "
                        f"forward (for example a weight penalty added to the loss). That part "
                        f"of its gradient belongs to no sample and is left out of per-sample "
                        f"statistics."
                    )
                continue
            user = self.names.get(id(stack[-1]), type(stack[-1]).__name__)
            raise ParameterUseError(
                f"parameter '{name}' is used directly inside the forward of module "
                f"'{user}' ({type(stack[-1]).__name__}), which does not own it, so its "
                f"per-sample gradient cannot be attributed exactly. Either leave it out "
                f"(GradientProbe(params=[...]) without '{name}'), or call the owning module "
                f"instead of using its weight, or share the Parameter object itself "
                f"(module_b.weight = module_a.weight), which the probe handles exactly."
            )
        return result
