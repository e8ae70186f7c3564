"""Benchmarks: each script runs on its own (python bench/NAME.py); shared helpers are imported
as bench.NAME."""
