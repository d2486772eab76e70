"""camkd: Confidence-Aware Multi-Teacher Knowledge Distillation from cached teacher outputs."""

__version__ = "0.1.0"
