"""Benchmarks: speed ratios measured side by side in one process (speed.py)."""
