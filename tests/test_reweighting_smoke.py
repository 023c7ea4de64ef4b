"""Smoke test of ``benchmarks/reweighting.py``: one tiny run per kind of method (no
reweighting, the default GWA rule, the loss-based baseline) trains and tabulates."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # `benchmarks` without -m

from benchmarks import reweighting


def test_quick_runs_and_tabulates() -> None:
    results = [
        reweighting.run(
            reweighting.Job(
                "digits", "sym40", 0, method, epochs=3, warmup=1, ema=1.0, train_limit=256
            )
        )
        for method in ("none", "clip", "loss-mixture")
    ]
    assert all(len(r["test"]) == 3 and 0 <= min(r["test"]) <= 1 for r in results)
    # the reweighted runs share the warm-up epoch with the unweighted one, then depart
    assert results[1]["test"][0] == results[0]["test"][0]
    assert len(results[0]["auroc"]["raw"]) == 3
    table = reweighting.tables(results)
    assert "| digits | sym40 | clip | 1 |" in table and "digits sym40 raw: 0:" in table
