"""What the benchmarks share: the machine and device a result was measured on, and random-weight teachers (speed
does not depend on the weights). Their files (--out) and figures are :mod:`camkd.output`'s."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

import camkd


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform reports)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The software and the host: versions, the CPU's cores, the date, OpenMP's waiting settings."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "camkd": camkd.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "")}


def device_info(device: torch.device | str, threads: list[int]) -> dict:
    """What the figures were computed on: the torch device type, the CPU model and the CPU threads torch used, and
    the GPU's name only when the device is a GPU (a CPU figure never names the machine's GPU)."""
    dev = torch.device(device)
    info = {"type": dev.type, "cpu": cpu_model(), "threads": list(threads)}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def random_teachers(arch: str, count: int, num_classes: int, work: Path) -> list[str]:
    """``count`` random-weight ``arch`` teachers (seeds 0 .. count-1) saved as camkd checkpoints in ``work``; their
    paths. Speed does not depend on the weights."""
    from camkd.checkpoint import atomic_save
    from camkd.models import create_model

    ckpts = []
    for k in range(count):
        torch.manual_seed(k)
        m = create_model(arch, num_classes=num_classes, in_channels=3)
        path = Path(work) / f"teacher{k}.pth"
        atomic_save({"model": m.state_dict(), "meta": {"arch": m.arch, "num_classes": num_classes, "in_channels": 3}}, path)
        ckpts.append(str(path))
    return ckpts


def device_text(d: dict) -> str:
    """``CPU (Intel Xeon ..., 1 and 2 threads)`` or ``GPU NAME (host CPU ..., 1 thread)``."""
    threads = " and ".join(str(t) for t in d["threads"])
    plural = "s" if d["threads"] != [1] else ""
    if d["type"] == "cuda":
        return f"GPU {d['gpu']} (host CPU {d['cpu']}, {threads} thread{plural})"
    return f"{d['type'].upper()} ({d['cpu']}, {threads} thread{plural})"
