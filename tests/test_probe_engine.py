"""Engine behaviour: weight tying, refused parameter uses, in-place outputs, training is
unchanged, memory, hook lifecycle, dtypes and devices."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICES,
    assert_close,
    assert_matches_oracle,
    expected_stats,
    per_sample_grads,
    run_probe,
    squared_error,
)
from torch import Tensor, nn

from lightning_gradwatch import GradientProbe, ParameterUseError
from lightning_gradwatch.probe.registry import LayerRule, register_rule


def _target_like(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.randn_like(model(x))


# --------------------------------------------------------------------------- weight tying
class _CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, 4)
        h = torch.tanh(self.shared(x))
        h = torch.tanh(self.shared(h))  # the same Linear twice
        c = self.conv(h.transpose(1, 2))
        c = self.conv(torch.tanh(c)).transpose(1, 2)  # the same Conv twice
        return self.head(c.mean(1))


@pytest.mark.parametrize("sum_grad_squared", [False, True])
def test_same_module_called_twice(sum_grad_squared: bool) -> None:
    torch.manual_seed(0)
    model = _CalledTwice().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    assert_matches_oracle(model, x, _target_like(model, x), sum_grad_squared=sum_grad_squared)


class _TiedLM(nn.Module):
    """Embedding and output head share one Parameter object."""

    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(idx))))


def _token_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(1)


@pytest.mark.parametrize("sum_grad_squared", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_parameter_shared_by_two_modules(reduction: str, sum_grad_squared: bool) -> None:
    torch.manual_seed(0)
    model = _TiedLM().double()
    assert "head.weight" not in dict(model.named_parameters())  # one canonical name
    idx = torch.tensor([[1, 1, 2, 6], [0, 3, 3, 3], [5, 4, 1, 1]])
    y = torch.randint(0, 7, idx.shape)
    stats = assert_matches_oracle(
        model, idx, y, _token_loss, reduction, sum_grad_squared=sum_grad_squared
    )
    assert "emb.weight" in stats.names


def _token_mean_loss(out: Tensor, y: Tensor) -> Tensor:
    """``(B,)`` each sample's loss averaged over its tokens."""
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


def test_token_averaged_loss_gives_the_gradient_of_each_samples_token_mean() -> None:
    # F.cross_entropy over (B, T) tokens averages over all B*T of them. With
    # loss_reduction="mean", g_i is the gradient of sample i's per-token mean loss (the
    # oracle's l_i), not of that mean times T: 1/B is divided out, and 1/T stays in l_i.
    torch.manual_seed(0)
    model = _TiedLM().double()
    idx = torch.tensor([[1, 1, 2, 6], [0, 3, 3, 3], [5, 4, 1, 1]])
    y = torch.randint(0, 7, idx.shape)
    assert_matches_oracle(model, idx, y, _token_mean_loss, "mean")
    # The same statistics from the library's usual call, F.cross_entropy's own token mean.
    probe = GradientProbe(model, loss_reduction="mean", sum_grad_squared=True)
    with probe:
        F.cross_entropy(model(idx).transpose(1, 2), y).backward()
    model.zero_grad(set_to_none=True)
    reference = run_probe(model, idx, y, _token_mean_loss, "mean", sum_grad_squared=True)
    for name in reference.names:
        torch.testing.assert_close(probe.stats.sq_norm[name], reference.sq_norm[name])
        torch.testing.assert_close(probe.stats.dot[name], reference.dot[name])


class _TiedConvAndNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(3, 3, 1)
        self.b = nn.Conv1d(3, 3, 1)
        self.b.weight = self.a.weight
        self.n1 = nn.GroupNorm(1, 3)
        self.n2 = nn.GroupNorm(1, 3)
        self.n2.weight = self.n1.weight
        with torch.no_grad():
            self.n1.weight.normal_()

    def forward(self, x: Tensor) -> Tensor:
        h = self.n1(torch.tanh(self.a(x)))
        return self.n2(torch.tanh(self.b(h)) * 2)


@pytest.mark.parametrize("sum_grad_squared", [False, True])
def test_parameter_shared_by_conv_and_norm_modules(sum_grad_squared: bool) -> None:
    torch.manual_seed(0)
    model = _TiedConvAndNorm().double()
    x = torch.randn(3, 3, 5, dtype=torch.float64)
    assert_matches_oracle(
        model, x, _target_like(model, x), sum_grad_squared=sum_grad_squared, chunk_elements=4
    )


class _ParentUsesChildWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, idx: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.emb(idx)))
        return F.linear(h, self.emb.weight)  # used outside the Embedding module


def test_parameter_used_inside_another_modules_forward_is_refused() -> None:
    torch.manual_seed(0)
    model = _ParentUsesChildWeight()
    idx = torch.randint(0, 6, (3, 5))
    probe = GradientProbe(model)
    with pytest.raises(ParameterUseError) as info, probe:
        model(idx).sum().backward()
    message = str(info.value)
    assert "'emb.weight'" in message
    assert "does not own it" in message
    assert "params=" in message  # says how to fix it
    _assert_no_hooks(model, probe)  # the error left nothing behind
    # Leaving the parameter out is the documented remedy and works.
    names = ["mix.weight", "mix.bias"]
    y = torch.randint(0, 6, idx.shape)
    assert_matches_oracle(model.double(), idx, y, _token_loss, names=names, params=names)


def test_weight_penalty_outside_modules_warns_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    probe = GradientProbe(model, verify="always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with probe:
            for _ in range(3):
                loss = squared_error(model(x), y).mean() + 0.1 * model[0].weight.pow(2).sum()
                loss.backward()
    relevant = [w for w in caught if "outside any module" in str(w.message)]
    assert len(relevant) == 1, [str(w.message) for w in caught]
    assert "'0.weight'" in str(relevant[0].message)
    # The per-sample statistics are those of the data loss alone (the penalty is no sample's).
    model.zero_grad(set_to_none=True)
    expected = run_probe(model, x, y, sum_grad_squared=False)
    for name in expected.names:
        torch.testing.assert_close(probe.stats.dot[name], expected.dot[name], rtol=1e-12, atol=0)
        torch.testing.assert_close(
            probe.stats.sq_norm[name], expected.sq_norm[name], rtol=1e-12, atol=0
        )


# --------------------------------------------------------------------------- in-place outputs
class _InplaceAfter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 5)
        self.conv = nn.Conv1d(5, 5, 3, padding=1)
        self.emb = nn.Embedding(4, 5)
        self.head = nn.Linear(5, 2)
        self.act = nn.ReLU(inplace=True)

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, idx = batch
        h = self.act(self.fc(x))  # overwrites fc's output
        c = self.conv(h.transpose(1, 2))
        c.mul_(2.0)  # overwrites conv's output
        e = self.emb(idx)
        e.add_(1.0)  # overwrites the embedding rows
        return self.head(torch.tanh(c.transpose(1, 2) + e))


def test_inplace_op_on_outputs_after_forward() -> None:
    torch.manual_seed(0)
    model = _InplaceAfter().double()
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    idx = torch.tensor([[0, 1, 1, 3, 2, 0]] * 4)
    batch = (x, idx)
    with torch.no_grad():
        y = torch.randn_like(model(batch))
    assert_matches_oracle(model, batch, y)


def test_inplace_op_on_a_linear_view_output_in_sequential() -> None:
    # Linear on (B, T, K) returns a reshaped view of a matmul result: ReLU(inplace=True) on a
    # view drops hooks registered on it, so the probe hooks the base instead.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)).double()
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    assert model[0](x)._is_view()
    assert_matches_oracle(model, x, _target_like(model, x))


class _SlicedOutput(nn.Module):
    """A custom module whose output is a strided view (a slice of a larger result)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(4, 6))

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.mix)[:, :4]


def test_inplace_op_on_a_strided_view_output_is_excluded_not_zero() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _SlicedOutput(), nn.ReLU(inplace=True), nn.Linear(4, 2))
    model = model.double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="in-place operation modified its output"):
        stats = run_probe(model, x, _target_like(model, x))
    assert "1.mix" in stats.excluded and "1.mix" not in stats.dot
    # Without the in-place op the same module is exact.
    model[2] = nn.ReLU()
    assert_matches_oracle(model, x, _target_like(model, x))


# --------------------------------------------------------------------------- training
def _train(optimizer_name: str, probed: bool, steps: int = 8) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 10, 16),
        nn.LayerNorm(16),
        nn.Tanh(),
        nn.Linear(16, 3),
    )
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    probe = GradientProbe(model, sum_grad_squared=True) if probed else None
    grads = []
    for _ in range(steps):
        x = torch.randn(8, 1, 10, generator=data)
        y = torch.randint(0, 3, (8,), generator=data)
        optimizer.zero_grad()
        if probe is not None:
            with probe:
                F.cross_entropy(model(x), y).backward()
            assert probe.stats.batch_size == 8
        else:
            F.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return model, grads


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_training_with_probe_is_bitwise_identical(optimizer_name: str) -> None:
    plain, plain_grads = _train(optimizer_name, probed=False)
    probed, probed_grads = _train(optimizer_name, probed=True)
    for (name, a), b in zip(plain.named_parameters(), probed.parameters(), strict=True):
        assert torch.equal(a, b), name
    for step_a, step_b in zip(plain_grads, probed_grads, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            assert torch.equal(a, b)


def test_probe_never_writes_grad() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    for p in model.parameters():
        p.requires_grad_(True)
    probe = GradientProbe(model, sum_grad_squared=True)
    with probe:
        loss = squared_error(model(x), y).mean()
        # Only autograd writes .grad; grads through autograd.grad leave .grad untouched.
        torch.autograd.grad(loss, list(model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert probe.has_stats and probe.stats.batch_size == 5


# --------------------------------------------------------------------------- memory, hooks
def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Tensor))


def _assert_no_hooks(model: nn.Module, probe: GradientProbe) -> None:
    from torch.nn.modules import module as module_mod
    from torch.overrides import _get_current_function_mode_stack

    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, m
        assert not m._backward_hooks
    for p in model.parameters():
        assert not p._backward_hooks
    assert not module_mod._global_forward_hooks
    assert not module_mod._global_forward_pre_hooks
    assert not _get_current_function_mode_stack()
    assert not probe._handles
    for owner in probe._owners:
        assert not owner.calls and owner.result is None


@pytest.mark.slow
def test_no_memory_growth_over_1000_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    probe = GradientProbe(model, sum_grad_squared=True)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    seen = []
    probe.add_listener(lambda stats: seen.append(stats.batch_size))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with probe:
            F.cross_entropy(model(x), y).backward()
            for owner in probe._owners:  # freed at the end of the backward, inside the block
                assert not owner.calls and owner.result is None
        optimizer.step()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
    try:
        for _ in range(20):  # warm-up: optimiser state, caches
            step()
        before = _live_tensors()
        for _ in range(1000):
            step()
        after = _live_tensors()
    finally:
        torch.set_num_threads(threads)
    assert after <= before, (before, after)
    assert len(seen) == 1020
    _assert_no_hooks(model, probe)


def test_captures_released_after_backward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    probe = GradientProbe(model)
    with probe:
        x = torch.randn(6, 4)
        out = model(x)
        hidden = weakref.ref(model[1](model[0](x)))  # an input the last Linear saw
        del hidden
        x_ref = weakref.ref(x)
        out.sum().backward()
        del x, out
        gc.collect()
        assert x_ref() is None  # the probe keeps no input alive after the backward
        for owner in probe._owners:
            assert not owner.calls
    _assert_no_hooks(model, probe)


def test_captures_released_while_the_caller_keeps_the_graph() -> None:
    # The grad hooks live on the graph, which the caller keeps alive through `loss`: the
    # captured inputs, outputs and output gradients must not stay alive with it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2), nn.LayerNorm(2))
    probe = GradientProbe(model, sum_grad_squared=True)
    with probe:
        loss = model(torch.randn(6, 3, 4)).pow(2).sum()
        calls = [call for owner in probe._owners for call in owner.calls]
        captured = [weakref.ref(t) for call in calls for t in (*call.args, *call.outputs)]
        loss.backward()
        gc.collect()
        assert len(calls) == 3 and len(captured) == 6
        assert all(ref() is None for ref in captured)
        assert all(g is None for call in calls for g in call.grads)  # output grads dropped
    assert loss.grad_fn is not None  # the graph is still referenced


def test_second_backward_through_a_retained_graph_is_not_probed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    probe = GradientProbe(model)
    seen = []
    probe.add_listener(seen.append)
    with probe:
        out = model(x)
        out.pow(2).sum().backward(retain_graph=True)
        first = probe.stats
        with pytest.warns(UserWarning, match="retain_graph=True"):
            out.sum().backward()
        assert not probe.has_stats  # not the first backward's numbers under a new name
        # A fresh forward is probed again, exactly.
        model(x).pow(2).sum().backward()
        again = probe.stats
    assert len(seen) == 2
    for name in first.names:
        torch.testing.assert_close(again.sq_norm[name], first.sq_norm[name], rtol=1e-12, atol=0)
    _assert_no_hooks(model, probe)


def test_forward_without_backward_is_freed_on_exit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    probe = GradientProbe(model)
    x = torch.randn(6, 4)
    x_ref = weakref.ref(x)
    with probe:
        out = model(x)
        assert any(owner.calls for owner in probe._owners)  # captured, awaiting backward
        del out, x
    gc.collect()
    assert x_ref() is None
    _assert_no_hooks(model, probe)
    assert not probe.has_stats


def test_no_grad_forward_captures_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    probe = GradientProbe(model)
    with probe:
        with torch.no_grad():
            model(torch.randn(6, 4))
        assert not any(owner.calls for owner in probe._owners)
        # An eval forward under no_grad between training steps does not disturb the stats.
        x = torch.randn(6, 4, dtype=torch.float32)
        model(x).sum().backward()
        assert probe.stats.batch_size == 6
    _assert_no_hooks(model, probe)


def test_stale_forward_does_not_leak_into_next_backward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    probe = GradientProbe(model)
    with probe:
        model(torch.randn(3, 4, dtype=torch.float64))  # forward, no backward (different B)
        squared_error(model(x), y).mean().backward()
    model.zero_grad(set_to_none=True)
    expected = run_probe(model, x, y)
    assert probe.stats.batch_size == 5
    for name in expected.names:
        torch.testing.assert_close(probe.stats.sq_norm[name], expected.sq_norm[name])


def test_attach_detach_and_reenter() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    probe = GradientProbe(model)
    with pytest.raises(RuntimeError, match="no statistics yet"):
        _ = probe.stats
    for _ in range(2):
        probe.attach()
        probe.attach()  # idempotent
        model(x).sum().backward()
        probe.detach()
        _assert_no_hooks(model, probe)
    first = probe.stats
    model(x * 2).sum().backward()  # outside the block: not probed
    assert probe.stats is first
    probe.reset()
    assert not probe.has_stats


def test_listeners_called_after_every_probed_backward() -> None:
    model = nn.Linear(3, 2)
    probe = GradientProbe(model)
    seen = []
    probe.add_listener(lambda stats: seen.append(stats))
    with probe:
        for b in (2, 3):
            model(torch.randn(b, 3)).sum().backward()
    assert [s.batch_size for s in seen] == [2, 3]
    assert seen[-1] is probe.stats


# --------------------------------------------------------------------------- dtypes, devices
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_statistics_dtype(dtype: torch.dtype) -> None:
    if dtype == torch.float16:
        try:
            torch.nn.functional.linear(torch.ones(1, 1, dtype=dtype), torch.ones(1, 1, dtype=dtype))
        except RuntimeError:
            pytest.skip("float16 matmul unsupported on this CPU build")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 2)).to(dtype)
    x = torch.randn(5, 3, 4, dtype=dtype)
    stats = run_probe(model, x, torch.randn(5, 3, 2, dtype=dtype), sum_grad_squared=True)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    for field in ("dot", "sq_norm", "sum_sq", "grad_sum", "param_sq_norm"):
        for name, value in getattr(stats, field).items():
            assert value.dtype == expected, (field, name, value.dtype)
    assert stats.alignment().dtype == expected
    assert stats.is_finite()
    if dtype in (torch.bfloat16, torch.float16):
        # Close to the float64 computation on the same (rounded) weights and inputs: the
        # backprops themselves are low precision, so this is a loose sanity bound only.
        reference = copy.deepcopy(model).double()
        ref = run_probe(
            reference,
            x.double(),
            torch.zeros(5, 3, 2, dtype=torch.float64),
            loss_fn=lambda out, t: out.pow(2).flatten(1).sum(1),
        )
        low = run_probe(
            model,
            x,
            torch.zeros(5, 3, 2, dtype=dtype),
            loss_fn=lambda out, t: out.pow(2).flatten(1).sum(1),
        )
        for name in ref.names:
            torch.testing.assert_close(
                low.sq_norm[name].double(), ref.sq_norm[name], rtol=0.1, atol=1e-3
            )


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_model_called_through_torch_compile(backend: str) -> None:
    """The probe on a module whose forward runs through ``torch.compile(module)`` (dynamo's
    own backends: no C++ compiler needed) gives the per-sample loop's statistics on every
    step, including the first (the one-time checks run under dynamo too)."""
    import torch._dynamo

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.LayerNorm(15), nn.Linear(15, 2)
    ).double()
    x = torch.randn(5, 2, 5, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    grads = per_sample_grads(model, squared_error, x, y, names)
    model.zero_grad(set_to_none=True)
    dot, sq, sum_sq = expected_stats(model, grads)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    probe = GradientProbe(model, sum_grad_squared=True)
    for _ in range(2):  # the first step runs the one-time checks
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dynamo's notes on global module hooks
            with probe:
                squared_error(compiled(x), y).mean().backward()
        stats = probe.stats
        assert sorted(stats.names) == sorted(names), stats.excluded
        for n in names:
            assert_close(stats.dot[n], dot[n], f"dot[{n}]")
            assert_close(stats.sq_norm[n], sq[n], f"sq_norm[{n}]")
            assert_close(stats.sum_sq[n], sum_sq[n], f"sum_sq[{n}]")
        model.zero_grad(set_to_none=True)
    torch._dynamo.reset()


def test_complex_layers_are_left_out_with_a_reason() -> None:
    """A complex layer (complex weights, or real weights fed complex inputs) gets complex
    backprops, for which the rules' real algebra gives no defined statistics: it is left out
    with a reason, and the real layers of the same model keep theirs."""

    class ComplexThenReal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.complex = nn.Linear(4, 3, dtype=torch.complex64)
            self.real = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.real(self.complex(x).abs())

    torch.manual_seed(0)
    model = ComplexThenReal()
    probe = GradientProbe(model, verify="never")
    with pytest.warns(UserWarning, match="complex"), probe:
        model(torch.randn(5, 4, dtype=torch.complex64)).pow(2).sum().backward()
    stats = probe.stats
    assert set(stats.excluded) == {"complex.weight", "complex.bias"}
    assert all("complex" in reason for reason in stats.excluded.values())
    assert set(stats.dot) == {"real.weight", "real.bias"}
    assert all(not value.is_complex() for value in stats.sq_norm.values())


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_live_on_the_parameters_device(device: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 4), nn.Conv1d(3, 3, 1), nn.Tanh(), nn.Linear(4, 2)).to(
        device
    )
    idx = torch.randint(0, 5, (4, 3), device=device)
    stats = run_probe(model, idx, torch.randn(4, 3, 2, device=device), sum_grad_squared=True)
    assert stats.names
    for field in ("dot", "sq_norm", "sum_sq", "grad_sum", "param_sq_norm"):
        for name, value in getattr(stats, field).items():
            assert value.device.type == torch.device(device).type, (field, name)
    assert stats.alignment().device.type == torch.device(device).type


@pytest.mark.parametrize("device", DEVICES)
def test_exact_on_every_device(device: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2))
    model = model.double().to(device)
    x = torch.randn(4, 2, 6, dtype=torch.float64, device=device)
    assert_matches_oracle(model, x, torch.randn(4, 2, dtype=torch.float64, device=device))


# --------------------------------------------------------------------------- configuration
def test_bad_configuration_raises_clear_errors() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="loss_reduction"):
        GradientProbe(model, loss_reduction="batchmean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="verify"):
        GradientProbe(model, verify="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown parameter names \['fc.weight'\]"):
        GradientProbe(model, params=["fc.weight"])


def test_params_selects_a_subset() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    names = ["2.weight"]
    stats = assert_matches_oracle(model, x, torch.randn(5, 2).double(), names=names, params=names)
    assert stats.names == names
    with pytest.raises(KeyError, match="not tracked"):
        stats.alignment(["0.weight"])


def test_frozen_parameters_are_not_tracked() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].weight.requires_grad_(False)
    x = torch.randn(5, 3, dtype=torch.float64)
    stats = assert_matches_oracle(model, x, torch.randn(5, 2).double())
    assert "0.weight" not in stats.names


def test_unused_tracked_parameter_has_zero_gradients() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    torch.manual_seed(0)
    model = Branchy().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    stats = assert_matches_oracle(model, x, torch.randn(4, 2).double())
    assert torch.equal(stats.sq_norm["unused.weight"], torch.zeros(4, dtype=torch.float64))


def test_cpu_autocast_with_scaled_loss() -> None:
    """bfloat16 autocast and a 1024 loss scale: float32 statistics, within bfloat16 rounding
    (loose bound, ~1% observed) of the float32 run without autocast."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(1),
        nn.Linear(24, 8),
        nn.LayerNorm(8),
        nn.Linear(8, 3),
    )
    x, y = torch.randn(4, 2, 6), torch.randn(4, 3)
    reference = run_probe(model, x, y, sum_grad_squared=True)
    probe = GradientProbe(model, sum_grad_squared=True, loss_scale=lambda: 1024.0)
    with probe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        (squared_error(out.float(), y).mean() * 1024.0).backward()
    stats = probe.stats
    assert stats.names == reference.names and stats.is_finite()
    for field in ("dot", "sq_norm", "sum_sq", "grad_sum"):
        for name, value in getattr(reference, field).items():
            assert getattr(stats, field)[name].dtype == torch.float32
            torch.testing.assert_close(
                getattr(stats, field)[name], value, rtol=5e-2, atol=5e-2 * value.abs().max()
            )


class _SeededDropout(nn.Module):
    """Re-seeds before each forward so that the probed run and the oracle draw the same masks."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        torch.manual_seed(1234)
        return self.inner(x)


def test_dropout_outside_fallback_modules_stays_exact() -> None:
    """Dropout between modules is part of each sample's own computation: the rules see the
    realised masks through the captured inputs and backprops. The attention module's own
    dropout is inside its forward, and exact too: its rule reads the backprops at its
    projections from its backward graph rather than replaying it."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True)
    model = _SeededDropout(layer).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    stats = assert_matches_oracle(model, x, torch.randn(3, 5, 8).double())
    assert not stats.excluded
    assert "inner.self_attn.in_proj_weight" in stats.names


class _Subset(nn.Module):
    """``sub`` sees only some rows of the batch (once, or twice with different row counts)."""

    def __init__(self, sub: nn.Module, row_counts: tuple[int, ...]) -> None:
        super().__init__()
        self.sub = sub  # registered first: the batch must not be taken from the first module
        self.main = nn.Linear(3, 3)
        self.row_counts = row_counts

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.main(x))
        for rows in self.row_counts:
            extra = self.sub(x[:rows])
            h = h + torch.cat([extra, torch.zeros_like(x[rows:])], 0)
        return h


@pytest.mark.parametrize("row_counts", [(2,), (4, 1), (2, 1)])
@pytest.mark.parametrize(
    "make_sub",
    [lambda: nn.Linear(3, 3), lambda: nn.LayerNorm(3), lambda: nn.PReLU(3)],
    ids=["linear", "layernorm", "fallback"],
)
def test_module_on_a_subset_of_the_batch_is_excluded(make_sub, row_counts) -> None:
    """The batch is the model input's; a module that saw fewer rows cannot be attributed to
    samples: it is left out (never broadcast, never a crash) and the rest stays exact."""
    torch.manual_seed(0)
    model = _Subset(make_sub(), row_counts).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    names = ["main.weight", "main.bias"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = assert_matches_oracle(model, x, _target_like(model, x), names=names)
    assert stats.batch_size == 4
    sub_names = [n for n, _ in model.named_parameters() if n.startswith("sub.")]
    assert set(stats.excluded) == set(sub_names)


def test_frozen_parameter_named_in_params_is_refused_at_construction() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['0.weight'\] are frozen \(requires_grad=False\)"):
        GradientProbe(model, params=["0.weight"])


class _DoubledLinear(nn.Linear):
    """A subclass of a supported layer with its own forward: the Linear rule does not apply."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, 2 * self.weight, self.bias)


class _EvalNormBatchNorm(nn.BatchNorm1d):
    """A BatchNorm subclass with its own forward: replayed, but still refused in training."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 1.5


def test_subclass_with_its_own_forward_uses_the_fallback() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_DoubledLinear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert_matches_oracle(model, x, _target_like(model, x))


def test_subclass_of_batchnorm_keeps_the_training_mode_refusal() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _EvalNormBatchNorm(4)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="'1' is left out.*batch statistics"):
        stats = run_probe(model, x, torch.zeros(5, 4, dtype=torch.float64))
    assert set(stats.excluded) == {"1.weight", "1.bias"}
    model.eval()
    assert_matches_oracle(model, x, torch.zeros(5, 4, dtype=torch.float64))


class _Renamed(nn.Module):
    """Opacus' ``RenameParamsMixin`` pattern: the child's parameters registered again on the
    parent under other names, and used only through the child."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(3, 4)
        self.register_parameter("l0_weight", self.cell.weight)
        self.l0_bias = self.cell.bias
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.cell(x)))


def test_reregistered_parameter_is_owned_by_the_module_that_uses_it() -> None:
    torch.manual_seed(0)
    model = _Renamed().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    stats = assert_matches_oracle(model, x, _target_like(model, x))
    assert set(stats.names) == {"l0_weight", "l0_bias", "head.weight", "head.bias"}


class _BrokenRuleModule(nn.Linear):
    """A module type whose (test-only) rule has a bug."""


@register_rule(_BrokenRuleModule)
class _BrokenRule(LayerRule):
    def compute(self, module: nn.Module, calls: list, ctx: object) -> dict:
        raise IndexError("a bug in the rule")


def test_a_bug_in_a_rule_propagates() -> None:
    """Only deliberate refusals (SkipModule) become exclusions; a bug is never a warning."""
    model = nn.Sequential(_BrokenRuleModule(3, 2))
    with GradientProbe(model), pytest.raises(IndexError, match="a bug in the rule"):
        model(torch.randn(4, 3)).sum().backward()


class _PickyForward(nn.Module):
    """A fallback module whose forward raises on anything but its training batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] != 4:
            raise ValueError(f"expected 4 rows, got {x.shape[0]}")
        return x * self.scale


def test_a_non_vmap_error_in_the_fallback_replay_propagates() -> None:
    model = nn.Sequential(_PickyForward())
    with GradientProbe(model), pytest.raises(ValueError, match="expected 4 rows, got 1"):
        model(torch.randn(4, 3)).sum().backward()


def _train_with_randomness_and_buffers(probed: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Tanh(), nn.Linear(6, 2)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(6, 5, generator=data), torch.randn(6, 2, generator=data)
        optimizer.zero_grad()
        if probed:  # a new probe each step: the sample-dim replay runs every step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # BatchNorm in training mode is left out
                with GradientProbe(model):
                    squared_error(model(x), y).mean().backward()
        else:
            squared_error(model(x), y).mean().backward()
        optimizer.step()
    return model


def test_sample_dim_replay_leaves_rng_and_buffers_untouched() -> None:
    """The verification forward's no-grad replay restores the RNG state and runs on copies of
    the buffers: dropout masks, running statistics and parameters stay bitwise identical."""
    plain = _train_with_randomness_and_buffers(probed=False)
    probed = _train_with_randomness_and_buffers(probed=True)
    for (name, a), b in zip(plain.state_dict().items(), probed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
