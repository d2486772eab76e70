"""camkd: Confidence-Aware Multi-Teacher Knowledge Distillation from cached teacher outputs."""

import os

# OpenMP (libgomp) threads spin ~300k iterations while waiting: several PyTorch processes sharing a small
# machine then slow each other down many times over. A short spin (GOMP_SPINCOUNT=3000) keeps most of one
# job's speed and avoids the collapse (BENCHMARKS.md: OMP waiting). Set before torch loads, and only when
# the user has chosen neither a wait policy nor a spin count.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "3000"

__version__ = "0.2.0"
