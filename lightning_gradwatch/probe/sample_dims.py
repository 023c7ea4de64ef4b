"""Along which dim each module sees the samples: built-in layouts, declared dims, and the
evidence of a replay with one sample changed."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten

from .owners import _Owner
from .registry import Call


class _SampleDims:
    """The sample-dim check of :class:`~lightning_gradwatch.probe.GradientProbe`, run as a
    model forward hook on the first probed forward."""

    _replaying: bool
    _dims_checked: bool
    _model_batch: int | None
    _batch_size: int | None
    _owners: list[_Owner]
    _warned: set[str]
    _declared_dims: set[int]

    def _check_sample_dims(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """On the first probed forward, find along which dim each module's input holds the
        samples, from evidence rather than shapes (which cannot tell ``(T, B)`` from
        ``(B, T)`` when ``T == B``).

        Replays the model forward without grad with sample 0 of its input changed (dim 0 of
        every batched tensor input: floats get 1 added, integers take sample 1's values), and
        compares each module's first input with the one it saw: the dim along which every
        change is confined to index 0 holds the samples. A module whose samples turn out to be
        along one other dim than assumed gets that dim (position-wise and generic rules use
        it; other rules refuse it with a warning). Without evidence (sample 0 does not reach
        the module, or the change is confined along several dims) the assumption stays. RNG
        states are restored and the replay runs on copies of the buffers, so training is
        unchanged; the cost is one forward
        pass without grad, once.
        """
        if self._replaying or not torch.is_grad_enabled() or self._dims_checked:
            return
        self._dims_checked = True
        leaves, spec = tree_flatten((args, kwargs))
        batch = self._model_batch
        if not batch or batch < 2 or (self._batch_size not in (None, batch)):
            return  # no sample 1 to copy, or the model's input is not batch-first
        perturbed = [_perturb_sample_zero(x, batch) for x in leaves]
        seen = {
            id(o.module): o.calls[0].args[0]
            for o in self._owners
            if o.calls and o.calls[0].args and isinstance(o.calls[0].args[0], Tensor)
        }
        # Per module, the dims its replayed first input differs along only at sample 0, found
        # as the replay reaches it: the replayed input is not kept, so the check holds no
        # second copy of the model's activations.
        replayed: dict[int, set[int]] = {}

        def record(module: nn.Module, module_args: tuple) -> None:
            first = module_args[0] if module_args else None
            if id(module) in seen and id(module) not in replayed and isinstance(first, Tensor):
                before = seen[id(module)]
                if before.shape == first.shape:
                    replayed[id(module)] = _confined_dims(before, first.detach(), batch)

        # Buffers are replaced by copies for the replay: in-place updates (running statistics)
        # must not touch the originals, whose version counters autograd checks.
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        rng = torch.random.get_rng_state()
        devices = {x.device for x in leaves if isinstance(x, Tensor) and x.device.type != "cpu"}
        accel = {d: torch.get_device_module(d).get_rng_state(d) for d in devices}
        handles = [o.module.register_forward_pre_hook(record) for o in self._owners]
        self._replaying = True
        try:
            with torch.no_grad():
                new_args, new_kwargs = tree_unflatten(perturbed, spec)
                functional_call(model, buffers, tuple(new_args), new_kwargs)
        except Exception as err:
            # The changed input may be invalid for the model (offsets, lengths, index ranges
            # that must stay consistent): the check has no evidence, and training goes on with
            # the declared or built-in sample dims, which the user can state explicitly.
            replayed.clear()
            if "sample dims" not in self._warned:
                self._warned.add("sample dims")
                rank_zero_warn(
                    f"lightning_gradwatch: could not check along which dim each module sees "
                    f"the samples: the model's forward failed on a copy of the batch whose "
                    f"sample 0 was changed ({type(err).__name__}: {err}). Modules are taken "
                    f"to hold samples along dim 0 (dim 1 inside sequence-first transformers, "
                    f"batch_first for recurrent layers); if that is wrong for some module, "
                    f"declare it with GradientProbe(batch_dims={{'module.name': dim}}).",
                    stacklevel=2,
                )
        finally:
            self._replaying = False
            for handle in handles:
                handle.remove()
            torch.random.set_rng_state(rng)
            for device, state in accel.items():
                torch.get_device_module(device).set_rng_state(state, device)
        for owner in self._owners:
            if id(owner.module) in self._declared_dims:
                continue  # the user's declaration stands
            found = replayed.get(id(owner.module))
            if found is None:
                continue
            native = owner.native_dim
            if found and native is not None:
                # The rule reads samples along its own dim: the evidence must agree with it.
                owner.dim_conflict = None if native in found else sorted(found)
                continue
            if not found or owner.batch_dim in found:
                continue  # no evidence (sample 0 did not reach it), or as assumed
            if len(found) == 1:
                # Position-wise and generic rules take it from here; other rules refuse it
                # (with a warning) when the step is computed.
                owner.batch_dim = found.pop()


_SEQUENCE_FIRST_CONTAINERS = (
    nn.Transformer,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
)


_STACKS = (nn.TransformerEncoder, nn.TransformerDecoder)


def _builtin_batch_dims(model: nn.Module) -> dict[int, int]:
    """``id(module) -> 1`` for every module inside a built-in transformer container that runs
    sequence-first (``batch_first=False``): its Linear, LayerNorm and attention submodules see
    ``(T, B, E)``. Layers carry the flag on ``self_attn``; ``nn.TransformerEncoder``/``Decoder``
    follow their first layer."""
    dims: dict[int, int] = {}
    for module in model.modules():
        if not isinstance(module, _SEQUENCE_FIRST_CONTAINERS):
            continue
        # Layers keep the flag on their attention module; stacks follow their first layer.
        layer = module.layers[0] if isinstance(module, _STACKS) and len(module.layers) else module
        attention = getattr(layer, "self_attn", None)
        flag = getattr(module, "batch_first", getattr(attention, "batch_first", None))
        if flag is False:
            dims.update((id(m), 1) for m in module.modules())
    return dims


def _samples_first(call: Call, batch_dim: int) -> Call:
    """The call of a position-wise layer with the sample dim of its first argument, its
    outputs and their gradients moved to dim 0 (the layer acts on each position alike)."""

    def move(x: Any) -> Any:
        return x.movedim(batch_dim, 0) if isinstance(x, Tensor) and x.dim() > batch_dim else x

    if call.input_grad is not None:  # its dots keep the input's layout
        call.input_grad.batch_dim = batch_dim
    return Call(
        args=(move(call.args[0]), *call.args[1:]) if call.args else call.args,
        kwargs=call.kwargs,
        outputs=[move(o) for o in call.outputs],
        output_versions=call.output_versions,
        grads=[move(g) for g in call.grads],
        input_grad=call.input_grad,
    )


def _perturb_sample_zero(x: Any, batch: int) -> Any:
    """``x`` with sample 0 (index 0 of dim 0) changed, if ``x`` is a batched tensor."""
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != batch:
        return x
    x = x.detach().clone()
    if x.is_floating_point() or x.is_complex():
        x[0] += 1
    else:  # token ids, class indices: stay in range by copying another sample
        x[0] = x[1]
    return x


def _confined_dims(before: Tensor, after: Tensor, batch: int) -> set[int]:
    """Dims of size ``batch`` along which every difference between ``before`` and ``after``
    lies at index 0; empty when nothing changed."""
    changed = before != after
    if not bool(changed.any()):  # once per probe, on the verification forward
        return set()
    return {
        d
        for d in range(changed.dim())
        if changed.shape[d] == batch and not bool(changed.narrow(d, 1, batch - 1).any())
    }
