"""What every benchmark shares: a description of the machine and writing a result only when asked."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

import camkd


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "camkd": camkd.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_result(r: dict, path: Path, markdown: str, plot: Callable[[dict, Path], None]) -> list[str]:
    """``path`` (JSON), ``path.md`` and ``path.png``; benchmarks write nothing unless given --out."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=2))
    path.with_suffix(".md").write_text(markdown + "\n")
    plot(r, path.with_suffix(".png"))
    return [str(path), str(path.with_suffix(".md")), str(path.with_suffix(".png"))]
