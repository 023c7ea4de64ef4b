"""Smoke test of ``benchmarks/``: the models build, the baselines compute the same statistics as
the probe (so the timing table compares like with like), and one repetition of the probe part
runs end to end. No timing is asserted."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parent.parent))  # `benchmarks` without -m

from benchmarks import overhead
from benchmarks.harness import MODEL_KEYS, CallbackCase
from benchmarks.models import make_model
from lightning_gradwatch import GradientProbe


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_vmap_baseline_matches_probe(key: str) -> None:
    """float32 on both sides, so rtol 1e-4 (the exact float64 comparison lives in the probe's
    own tests); a mismatch here would mean the benchmark times different work."""
    torch.manual_seed(0)
    model, x, y = make_model(key, batch_size=2)
    probe = GradientProbe(model, sum_grad_squared=True)
    with probe:
        F.cross_entropy(model(x), y).backward()
    stats = probe.stats
    assert stats.batch_size == x.shape[0] and not stats.excluded

    named = dict(model.named_parameters())
    params = {n: p.detach() for n, p in named.items()}

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor):
        logits = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    per_sample_grad = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))
    with warnings.catch_warnings():  # vmap has no batching rule for CPU flash attention
        warnings.simplefilter("ignore", UserWarning)
        grad_sample = per_sample_grad(params, x, y)
    expected = overhead._stats_from_grad_sample(named, grad_sample, sum_sq=True)
    for name in named:
        for field, actual in (
            ("dot", stats.dot[name]),
            ("sq_norm", stats.sq_norm[name]),
            ("sum_sq", stats.sum_sq[name]),
        ):
            want = expected[f"{name}.{field}"]
            scale = want.abs().max().item() or 1.0
            torch.testing.assert_close(actual, want, rtol=1e-4, atol=1e-5 * scale)


def test_probe_part_runs_once() -> None:
    rows = overhead.time_probe_part(
        ["mlp"],
        repeats=1,
        warmup=1,
        device=torch.device("cpu"),
        with_backpack=False,
        batch_size=4,
    )
    configs = [r.config for r in rows]
    assert configs == ["plain", "probe dot+norm", "probe dot+norm+sum_sq", "vmap(grad)"]
    assert all(math.isfinite(r.ratio) and r.median_ms > 0 for r in rows)
    table = overhead.probe_table(rows, "extra RSS")
    assert table.count("\n") == len(rows) + 1  # header, rule, one line per row
    assert "<= 1.10" in table and "<= 1.45" in table


def test_scaling_quick_mode() -> None:
    """Every axis of the scaling table runs (two tiny points each) and lands in the table."""
    rows = overhead.time_scaling(repeats=1, warmup=1, device=torch.device("cpu"), quick=True)
    table = overhead.scaling_table(rows)
    axes = {(key, label) for label, key, _, _ in overhead.SCALING_AXES}
    assert table.count("\n") == 2 * len(axes) + 1  # header, rule, two settings per axis
    for key, label in axes:
        assert f"| {key} | {label} " in table
    assert all(math.isfinite(r.ratio) for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_device_refused_without_cuda() -> None:
    with pytest.raises(SystemExit, match="CUDA is not available"):
        overhead.main(["--device", "cuda", "--quick"])


def test_memory_ratio_counts_the_state() -> None:
    plain = overhead.ProbeRow("mlp", "plain", 1.0, 1.0, None, peak_mb=10.0, base_mb=30.0)
    probed = overhead.ProbeRow("mlp", "probe", 1.0, 1.0, None, peak_mb=18.0, base_mb=30.0)
    assert overhead.memory_ratio(probed, plain) == pytest.approx(48 / 40)
    assert overhead.memory_ratio(probed, None) is None


def test_cases_are_discoverable() -> None:
    cases, failures = overhead.discover_cases()
    assert all(isinstance(case, CallbackCase) for _, case in cases)
    labels = [case.label for _, case in cases]
    assert "no-op callback (control)" in labels, (labels, failures)
    assert "quick-start set, defaults, per epoch" in labels, (labels, failures)


def test_quick_start_case_times_whole_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick-start case runs end to end on the MLP in quick mode, timed per epoch."""
    from benchmarks.cases import quickstart

    monkeypatch.setattr(
        overhead, "discover_cases", lambda: ([("quickstart", quickstart.CASES[0])], [])
    )
    rows, failures = overhead.time_callback_part(
        ["mlp"], repeats=1, steps=3, warmup=1, accelerator="cpu", batch_size=4, quick=True
    )
    assert not failures
    (row,) = rows
    assert row.error is None, row.error
    assert math.isfinite(row.ratio) and row.plain_ms > 0


def test_early_stopping_study_quick_mode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The study's ``--quick`` mode (shortened to 3 epochs): both Lightning runs, every candidate
    rule replayed, the JSON written and the tables printed."""
    from benchmarks import early_stopping

    out = tmp_path / "results.json"
    early_stopping.main(
        [
            "--quick",
            "--epochs",
            "3",
            "--workers",
            "1",
            "--out",
            str(out),
            "--root-dir",
            str(tmp_path),
        ]
    )
    (run,) = json.loads(out.read_text())
    assert (run["dataset"], run["arch"], run["noise"], run["seed"]) == ("digits", "mlp", 0.2, 0)
    assert len(run["history"]) == len(run["test_acc"]) == len(run["auroc"]) == 3
    assert all(0.5 < a <= 1.0 for a in run["auroc"])  # 20% noise: better than chance
    rows = early_stopping.evaluate(run)
    assert len(rows) == len(early_stopping.CANDIDATES) + 5
    for row in rows.values():
        assert 0 <= row["epoch"] < 3 and 1 <= row["trained"] <= 3 and 0 < row["acc"] <= 100
    printed = capsys.readouterr().out
    assert f"| {early_stopping.DEFAULT_LABEL} | 20% |" in printed


def test_step_anatomy_runs_and_restores_the_hooks() -> None:
    """The parts of ``benchmarks/step_anatomy.py`` on a few steps: every row is a positive
    time, and the timing wrappers are removed afterwards."""
    from benchmarks import step_anatomy
    from lightning_gradwatch import GradientWeightAlignment
    from lightning_gradwatch.probe.capture import _Capture

    cold = step_anatomy.cold_ops("mlp", 8)
    assert len(cold) == 6 and all(micros > 0 for _, micros in cold)
    before = (_Capture._make_grad_hook, GradientWeightAlignment.on_after_backward)
    plain, head, per_step = step_anatomy.hook_costs("mlp", steps=3, epochs=2)
    assert plain > 0 and head > 0
    assert per_step["probe: output-gradient hook (the rule)"] > 0
    assert (_Capture._make_grad_hook, GradientWeightAlignment.on_after_backward) == before
    noise = step_anatomy.noise_costs(repeats=2)
    assert len(noise) == 2 and all(call > 0 and one > 0 for _, call, one in noise)
    windows = step_anatomy.window_costs(repeats=1)
    # Six convolutions (three per CNN), each as it is and without its padding.
    assert len(windows) == 12 and all(micros > 0 for _, micros in windows)


def test_attention_blocks_runs() -> None:
    """``benchmarks/attention_blocks.py`` on one block with an unused head, one pair."""
    from benchmarks import attention_blocks

    value, plain_ms = attention_blocks.ratio(blocks=1, repeats=1, aux_head=True)
    assert value > 0 and plain_ms > 0
