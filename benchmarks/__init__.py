"""Benchmarks of st_assets, runnable as ``python -m benchmarks.<name>``; results go to BENCHMARKS.md."""
