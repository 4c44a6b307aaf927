"""Benchmarks and load tools: not part of the shipped service (not installed, not in the image).

Run from the repository root: ``python -m benchmarks.bench``, ``python -m benchmarks.soak``,
``python -m benchmarks.loadgen``, ``python -m benchmarks.bench_plain``.
"""
