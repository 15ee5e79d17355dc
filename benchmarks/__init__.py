"""Benchmark scripts; ``benchmarks/gpubench`` is the code behind ``benchmarks/gpu.py``."""
