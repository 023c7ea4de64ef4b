"""Benchmark cases contributed per callback; ``benchmarks/overhead.py`` discovers every module
here and times each :class:`benchmarks.harness.CallbackCase` in its ``CASES`` list."""
