"""What the benchmarks and `camkd report` share: the machine and device a result was measured on, and its
files (``--out PREFIX`` -> PREFIX.json, PREFIX.md, PREFIX.png; nothing is written without --out)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import camkd
from camkd.errors import CamkdError

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

SUFFIXES = (".json", ".md", ".png")  # what --out writes; one of them given on --out is taken off the prefix


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


def output_prefix(out: str | Path) -> Path:
    """The prefix of --out's three files (a given .json/.md/.png is taken off), checked before any work or output
    so that a bad --out is one error line, not a failure after a long run."""
    given = Path(out)
    prefix = given.with_suffix("") if given.suffix in SUFFIXES else given
    if given.is_dir():
        raise CamkdError(f"--out {given} is a folder; give a file name prefix such as {given / 'result'} "
                         f"(writes result.json, result.md and result.png there)")
    for path in files(prefix):
        if path.is_dir():
            raise CamkdError(f"--out {given} would write {path}, which is a folder; choose another prefix")
    existing = next(p for p in (prefix.absolute(), *prefix.absolute().parents) if p.exists())
    if existing != prefix.absolute() and not existing.is_dir():
        raise CamkdError(f"--out {given}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
        raise CamkdError(f"--out {given}: cannot write in {existing}; choose a writable path")
    return prefix


def files(prefix: Path) -> list[Path]:
    """PREFIX.json, PREFIX.md, PREFIX.png (a dot in the prefix's name is kept: run.v2 -> run.v2.json)."""
    return [prefix.with_name(prefix.name + s) for s in SUFFIXES]


def new_figure(nrows: int, ncols: int, figsize: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A figure on the file-only Agg backend and its axes as a 2-D array (whatever the shape)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)


def write_result(data: dict, prefix: Path, markdown: str, fig: Figure) -> list[str]:
    """``data`` as PREFIX.json, ``markdown`` as PREFIX.md and ``fig`` as PREFIX.png (then closed); returns the paths."""
    import matplotlib.pyplot as plt

    js, md, png = files(Path(prefix))
    try:
        js.parent.mkdir(parents=True, exist_ok=True)
        js.write_text(json.dumps(data, indent=2))
        md.write_text(markdown + "\n")
        fig.tight_layout()
        fig.savefig(png, dpi=100)
    except OSError as e:
        raise CamkdError(f"cannot write --out {prefix}: {e.strerror or e}; choose a writable path") from None
    finally:
        plt.close(fig)
    return [str(js), str(md), str(png)]
