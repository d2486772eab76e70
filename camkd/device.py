"""Device choice and the speed/determinism switches shared by every command."""

from __future__ import annotations

import os

import torch

from camkd.errors import CamkdError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is a user error."""
    name = name.lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CamkdError(f"--device {name} asked for, but no CUDA device is available here; use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise CamkdError(f"unknown device '{name}'; choose auto, cpu or cuda")


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (for the equality tests); off gives cuDNN autotuning on CUDA."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
