"""Benchmarks with same-run baselines (`make bench`, `python -m bench`); see docs/PERFORMANCE.md."""
