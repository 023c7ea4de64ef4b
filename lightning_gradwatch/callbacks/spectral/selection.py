"""Which weights ``SpectralNorms`` tracks, and how each is read as a matrix."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ...functional.spectral import as_matrix, compute_dtype
from ...probe.rules.parametrized import effective_tensor, reparametrized_tensors

#: Module types whose matrix-shaped parameters are tracked when neither ``params`` nor
#: ``module_types`` is given. ``_ConvNd`` covers ConvNd and ConvTransposeNd;
#: ``MultiheadAttention`` contributes ``in_proj_weight`` (or ``q/k/v_proj_weight``), its output
#: projection is a ``Linear``.
DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.Embedding,
    nn.MultiheadAttention,
)


@dataclass
class TrackedWeight:
    """One tracked weight: its name, owner and matrix view."""

    name: str
    param: nn.Parameter
    module: nn.Module
    output_dim: int  # 1 for ConvTransposeNd, whose weight is (in, out/groups, *kernel)
    #: For a reparametrized weight (``name`` is then the module's attribute, e.g.
    #: ``fc.weight``, and ``param`` its first trainable source): the attribute's name in
    #: ``module``, read with :func:`effective_tensor`.
    effective: str | None = None

    def weight(self) -> Tensor:
        """The weight as the layer uses it (the effective tensor when reparametrized)."""
        if self.effective is not None:
            return effective_tensor(self.module, self.effective)
        return self.param.detach()

    def matrix(self) -> Tensor:
        """``(out, rest)`` matrix view in the compute dtype (at least float32)."""
        weight = self.weight()
        return as_matrix(weight.to(compute_dtype(weight.dtype)), self.output_dim)


def select_weights(
    model: nn.Module,
    params: Sequence[str] | None,
    module_types: tuple[type[nn.Module], ...] | None,
) -> list[TrackedWeight]:
    """The weights to track, in model order: parameters with 2 or more dimensions matching the
    ``fnmatch`` patterns ``params`` and owned by ``module_types`` (both optional;
    :data:`DEFAULT_MODULE_TYPES` when neither is given), reparametrized weights first.

    Raises:
        ValueError: a pattern that matches nothing or only vectors, or nothing to track.
    """
    owners: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), module)
    if module_types is None and params is None:
        module_types = DEFAULT_MODULE_TYPES
    named = list(model.named_parameters())
    if params is not None:
        # A reparametrized weight is matched by its attribute name (``fc.weight``) too.
        effective = [
            (n, effective_tensor(m, a)) for n, (m, a) in _reparametrized_modules(model).items()
        ]
        for pattern in params:
            hits = [(n, p) for n, p in named + effective if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(
                    f"SpectralNorms: params pattern {pattern!r} matches no parameter. "
                    f"Parameter names look like {[n for n, _ in named[:5]]}"
                )
            if all(p.dim() < 2 for _, p in hits):
                raise ValueError(
                    f"SpectralNorms: params pattern {pattern!r} matches only vectors "
                    f"({[n for n, _ in hits[:5]]}); spectral norms need weights with 2 or "
                    f"more dimensions, so name weight matrices (e.g. '*.weight')"
                )
    tracked = _select_reparametrized(model, params, module_types)
    sources = {id(p) for t in tracked for p in t.module.parameters()}
    for name, p in named:
        if p.dim() < 2 or id(p) in sources:
            continue
        if params is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in params):
            continue
        module = owners[id(p)]
        if module_types is not None and not isinstance(module, module_types):
            continue
        tracked.append(TrackedWeight(name, p, module, output_dim=_output_dim(module)))
    if not tracked:
        raise ValueError(
            f"SpectralNorms: no weight to track (params={params}, module_types="
            f"{module_types}). Pass params=[...] with parameter-name patterns or "
            f"module_types=(...) matching modules that hold weight matrices"
        )
    return tracked


def _output_dim(module: nn.Module) -> int:
    transposed = isinstance(module, nn.modules.conv._ConvNd) and module.transposed
    return 1 if transposed else 0


def _select_reparametrized(
    model: nn.Module,
    params: Sequence[str] | None,
    module_types: tuple[type[nn.Module], ...] | None,
) -> list[TrackedWeight]:
    """Reparametrized weights (``parametrize``, legacy weight/spectral-norm hooks) of matching
    modules, tracked as the effective weight the layer uses, under the module's attribute name
    (``fc.weight``). Their gradient spectra are not computed: the effective weight is not a
    leaf and has no ``.grad``."""
    named = dict(model.named_parameters())
    tracked = []
    for name, (_how, source_names) in reparametrized_tensors(model).items():
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        if not source_names or (module_types is not None and not isinstance(module, module_types)):
            continue
        if params is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in params):
            continue
        if effective_tensor(module, attribute).dim() < 2:
            continue
        tracked.append(
            TrackedWeight(
                name,
                named[source_names[0]],
                module,
                output_dim=_output_dim(module),
                effective=attribute,
            )
        )
    return tracked


def _reparametrized_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{"fc.weight": (fc, "weight")}`` for every reparametrized tensor of ``model``."""
    modules = dict(model.named_modules())
    found = {}
    for name in reparametrized_tensors(model):
        module_name, _, attribute = name.rpartition(".")
        found[name] = (modules[module_name], attribute)
    return found


def conv_grid_recorder(grids: dict[str, tuple[int, ...]], name: str) -> Any:
    """A forward pre-hook recording, once, the padded spatial size of a conv layer's input
    into ``grids[name]`` (the grid :func:`conv_operator_norm_fft` needs)."""

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        if name in grids or not args or not isinstance(args[0], Tensor):
            return
        spatial = tuple(args[0].shape[-(module.weight.dim() - 2) :])
        if module.padding_mode == "circular":
            grids[name] = spatial
        else:
            # _reversed_padding_repeated_twice lists (left, right) pairs, last dim first.
            pads = module._reversed_padding_repeated_twice
            d = len(spatial)
            grids[name] = tuple(
                n + pads[2 * (d - 1 - i)] + pads[2 * (d - 1 - i) + 1] for i, n in enumerate(spatial)
            )

    return record
