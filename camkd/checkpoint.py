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
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    """Load a camkd checkpoint, a reference ``{'model': state_dict}`` file or a bare state_dict (torchvision's format),
    on CPU, as ``{'model': state_dict, ...}``; anything else is a one-line user error."""
    path = Path(path)
    if path.is_dir():
        found = [f.name for f in (path / "best.pth", path / "last.pth") if f.is_file()]
        hint = f"give a checkpoint in it, e.g. {path / found[0]}" if found else "give the path of a .pth file"
        raise CamkdError(f"checkpoint {path} is a folder; {hint}")
    if not path.is_file():
        raise CamkdError(f"checkpoint {path} not found")
    if path.stat().st_size == 0:
        raise CamkdError(f"checkpoint {path} is empty (0 bytes); use another checkpoint (e.g. best.pth) or retrain")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        head = path.read_bytes()[:4]
        if head[:1] != b"\x80" and head != b"PK\x03\x04":  # neither a pickle nor the start of torch's zip
            kind = "it is not a torch file"
        elif "Weights only load failed" in str(e) and "Unsupported" in str(e):
            kind = "it holds Python objects other than tensors and plain data"
        else:  # a torch file's start without its end: a copy or a write cut short (a full disk, a killed copy)
            kind = "it is truncated or corrupt: copy it again from where it came from"
        raise CamkdError(f"{path} is not a readable torch checkpoint ({kind}); use another checkpoint (a run folder "
                         "also has best.pth) or retrain") from None
    if isinstance(ckpt, dict) and "model" not in ckpt and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"model": ckpt}  # a bare state_dict: torchvision's own format (torch.save(model.state_dict()))
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CamkdError(f"{path} is not a camkd or reference checkpoint (expected a state_dict, or a dict with a 'model' "
                         "state_dict)")
    if not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise CamkdError(f"{path}: 'model' is not a state_dict of tensors")
    return ckpt
