"""camkd: Confidence-Aware Multi-Teacher Knowledge Distillation from cached teacher outputs."""

import os

# OpenMP threads that spin while waiting make several PyTorch processes on a small machine slow each
# other down many times over; passive waiting keeps one job's speed (BENCHMARKS.md). Set before torch
# loads, and only when the user has not chosen.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"
