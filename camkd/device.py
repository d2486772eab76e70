"""Device choice and the speed/determinism switches shared by every command."""

from __future__ import annotations

import os

import torch

from camkd.errors import CamkdError

DEVICES = ("auto", "cpu", "cuda")  # what --device takes: auto is cuda when available, else cpu


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


def free_memory(device: torch.device) -> tuple[int, str] | None:
    """(free bytes, where they were read) on ``device``; None where camkd cannot tell."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + unused), f"free on {device}"
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available host memory (MemAvailable)"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free host memory"
    except (ValueError, OSError, AttributeError):
        return None
