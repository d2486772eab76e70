"""Fashion-MNIST from IDX files: Debian's ``dataset-fashion-mnist`` or torchvision's layout."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from camkd.data.base import register_dataset
from camkd.data.inmemory import Dataset
from camkd.data.norm import Normalization
from camkd.errors import CamkdError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_NORM = Normalization((0.2860,), (0.3530,))
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _candidates(data_dir: Path | None) -> list[Path]:
    """Where to look: the folder the user named (never anything else), or Debian's copy."""
    if data_dir is not None:
        return [data_dir, data_dir / "FashionMNIST" / "raw", data_dir / "fashion-mnist"]
    return [DEBIAN_DIR]


def _find(stem: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise CamkdError(f"cannot read {path}: {e}; reinstall it (apt-get install --reinstall dataset-fashion-mnist)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CamkdError(f"{path} is not an IDX file of unsigned bytes; reinstall it")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise CamkdError(f"{path} is truncated ({len(raw) - offset} bytes, expected {int(np.prod(dims))}); reinstall it")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


@register_dataset("fashion-mnist")
def fashion_mnist(*, split: str, data_dir: Path | None, download: bool = False) -> Dataset:
    dirs = _candidates(data_dir)
    img_stem, lbl_stem = _FILES[split]
    img_path, lbl_path = _find(img_stem, dirs), _find(lbl_stem, dirs)
    if img_path is None or lbl_path is None:
        if download:
            from torchvision import datasets as tvd

            root = data_dir or Path("data")
            try:
                tvd.FashionMNIST(str(root), train=(split == "train"), download=True)
            except Exception as e:
                raise CamkdError(f"downloading fashion-mnist into {root} failed: {e}") from None
            return fashion_mnist(split=split, data_dir=root, download=False)
        raise CamkdError(
            f"fashion-mnist {split} files ({img_stem}[.gz]) not found in {', '.join(map(str, dirs))}"
            + ("; put them there, or drop --data-dir to use Debian's copy (apt-get install -y dataset-fashion-mnist)"
               if data_dir is not None else "; install them with 'apt-get install -y dataset-fashion-mnist' or give --data-dir")
        )
    images = read_idx(img_path)
    labels = read_idx(lbl_path).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise CamkdError(f"{img_path} and {lbl_path} do not match ({images.shape} vs {labels.shape})")
    return Dataset("fashion-mnist", split, torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels), 10, FASHION_NORM)
