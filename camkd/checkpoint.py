"""Checkpoints: ``{'model': state_dict, 'meta': {...}}`` as the reference, written atomically with a sha256.

A camkd checkpoint adds ``meta`` (arch, num_classes, in_channels, image size, dataset and its
fingerprint, epoch, accuracy, options, camkd version) and, for ``last.pth``, the optimizer
state. Reference checkpoints (RepDistiller / CA-MKD) are ``{'model': state_dict, ...}`` and
load too, given the arch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from camkd.errors import CamkdError


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_save(obj: Any, path: Path) -> str:
    """torch.save to a temporary file, fsync, rename over ``path``; write ``path.sha256``. Returns the digest."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    side = path.with_name(path.name + ".sha256")
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(f"{digest}  {path.name}\n")
    os.replace(side_tmp, side)
    return digest


def load_checkpoint(path: str | Path) -> dict:
    """Load a camkd or reference checkpoint on CPU; anything else is a one-line user error."""
    path = Path(path)
    if not path.is_file():
        raise CamkdError(f"checkpoint {path} not found")
    if path.stat().st_size == 0:
        raise CamkdError(f"checkpoint {path} is empty (0 bytes); it was cut off while being written: use best.pth or retrain")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        kind = "it holds Python objects other than tensors and plain data" if "Weights only load failed" in str(e) \
            else "the file is truncated or not a torch file"
        raise CamkdError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {kind})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CamkdError(f"{path} is not a camkd or reference checkpoint (expected a dict with a 'model' state_dict)")
    if not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise CamkdError(f"{path}: 'model' is not a state_dict of tensors")
    return ckpt


def check_writable(out: Path) -> None:
    """Create ``out`` and prove a file can be written there, before any work is done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".camkd-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CamkdError(f"cannot write to --out {out}: {e.strerror or e}; choose a writable folder") from None


def prepare_run_dir(out: Path, *, resume: bool) -> tuple[Path, Path]:
    """Check a run folder before any work: writable, and holding a run exactly when resuming. Returns (last, best)."""
    check_writable(out)
    last_path, best_path = out / "last.pth", out / "best.pth"
    if last_path.exists() and not resume:
        raise CamkdError(f"{out} already holds a run (last.pth); add --resume to continue it or choose another --out")
    if resume and not last_path.exists():
        raise CamkdError(f"--resume: no checkpoint {last_path}; run without --resume to start")
    return last_path, best_path
