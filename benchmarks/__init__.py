"""Benchmarks: `python -m benchmarks.NAME --help` for each; harness.py holds what they share (counting,
timing, the generate-judge-row loop, tables, the common flags and the output rule)."""
