"""Benchmarks: each prints a ratio against a baseline measured in the same run (machines here are noisy)."""
