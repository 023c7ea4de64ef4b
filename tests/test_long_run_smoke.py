"""Smoke test of ``benchmarks/long_run.py`` in quick mode (300 steps): it runs with every
quick-start callback attached and prints one row per window. No timing is asserted."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent))  # `benchmarks` without -m

from benchmarks import long_run


def test_quick_mode_prints_a_row_per_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(long_run.tempfile, "tempdir", str(tmp_path))  # logs under tmp_path
    long_run.main(["--steps", "300", "--window", "100"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "-" in line[2:6]]
    assert [row.split(" | ")[0] for row in rows] == ["| 0-99", "| 100-199", "| 200-299"]
    for row in rows:
        wall_ms, cpu_ms, rss, tensors = (float(c) for c in row.strip("| ").split(" | ")[1:])
        assert math.isfinite(wall_ms) and wall_ms > 0 and cpu_ms > 0 and rss > 0 and tensors > 0
    assert "last/first quarter" in out and "load average" in out
    assert not list(tmp_path.iterdir())  # the temporary log directory was removed
