"""Benchmarks: `eflow bench attention`."""
