"""CIFAR-10/100 read from torchvision's on-disk format (the pickled python batches).

The batches are read directly (no md5 check, so small files in the same format work);
``download=True`` lets torchvision fetch and verify the archive first.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from camkd.data.base import register_dataset
from camkd.data.inmemory import Dataset
from camkd.data.norm import Normalization
from camkd.errors import CamkdError

# The reference's normalization (RepDistiller dataset/cifar100.py); CIFAR-10 uses the usual CIFAR-10 statistics.
CIFAR100_NORM = Normalization((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
CIFAR10_NORM = Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
        raise CamkdError(f"cannot read CIFAR batch {path}: {e}; delete it and rerun with --download") from None
    if len(labels) != len(data):
        raise CamkdError(f"CIFAR batch {path} has {len(data)} images but {len(labels)} labels; it is corrupted")
    return data, labels


def _load(name: str, split: str, data_dir: Path | None, download: bool) -> Dataset:
    folder, train_files, test_files, label_key, num_classes = _LAYOUT[name]
    root = data_dir or Path("data")
    if download:
        from torchvision import datasets as tvd

        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        try:
            cls(str(root), train=(split == "train"), download=True)
        except Exception as e:  # network errors come in many types
            raise CamkdError(f"downloading {name} into {root} failed: {e}") from None
    files = [root / folder / f for f in (train_files if split == "train" else test_files)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CamkdError(
            f"{name} {split} files not found: {', '.join(missing)}; "
            f"point --data-dir at the folder holding '{folder}/' (torchvision's layout) or add --download"
        )
    parts = [_read_batch(f, label_key) for f in files]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise CamkdError(f"{name} labels outside 0..{num_classes - 1} in {root / folder}; the files are corrupted")
    norm = CIFAR100_NORM if name == "cifar100" else CIFAR10_NORM
    return Dataset(name, split, images, labels, num_classes, norm)


@register_dataset("cifar100")
def cifar100(*, split: str, data_dir: Path | None, download: bool = False) -> Dataset:
    return _load("cifar100", split, data_dir, download)


@register_dataset("cifar10")
def cifar10(*, split: str, data_dir: Path | None, download: bool = False) -> Dataset:
    return _load("cifar10", split, data_dir, download)
