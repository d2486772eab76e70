"""The in-memory dataset type, its fingerprint, and the name -> loader registry."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from camkd.errors import CamkdError
from camkd.registry import Registry


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std applied after ``x / 255`` (as torchvision's ToTensor + Normalize)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}


@dataclass
class Dataset:
    """One split of a dataset, whole in memory."""

    name: str
    split: str
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    num_classes: int
    norm: Normalization
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be [N] matching images")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def fingerprint(self) -> str:
        """sha256 over name, split, shape, image bytes and label bytes: identifies the data for the cache."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(f"{self.name}|{self.split}|{tuple(self.images.shape)}|{self.num_classes}".encode())
            h.update(self.images.detach().cpu().contiguous().numpy().tobytes())
            h.update(self.labels.detach().cpu().contiguous().numpy().astype("<i8").tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def limit(self, n: int | None) -> Dataset:
        """The first ``n`` samples (all when ``n`` is None); more than the split holds is refused, not capped."""
        if n is None or n == len(self):
            return self
        if n <= 0:
            raise CamkdError(f"--limit must be positive, got {n}")
        if n > len(self):
            raise CamkdError(f"--limit {n} is more than the {len(self)} samples of {self.name}'s {self.split} split; "
                             f"give at most --limit {len(self)}, or drop --limit to use them all")
        return Dataset(self.name, self.split, self.images[:n].clone(), self.labels[:n].clone(), self.num_classes, self.norm)

    def to(self, device: torch.device | str) -> Dataset:
        """Move images and labels to ``device`` once; the fingerprint is kept."""
        return Dataset(
            self.name, self.split, self.images.to(device), self.labels.to(device), self.num_classes, self.norm, self._fingerprint
        )


Loader = Callable[..., Dataset]
DATASETS: Registry[Loader] = Registry("dataset")  # filled by the loader modules, which camkd/data/__init__.py imports


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator: register a loader ``fn(*, split, data_dir, download, **options) -> Dataset`` under ``name``."""
    return DATASETS.register(name)


def dataset_names() -> list[str]:
    """Every dataset name, sorted."""
    return DATASETS.names()


def check_dataset(name: str) -> None:
    """Refuse an unknown dataset name before anything is loaded."""
    DATASETS.resolve(name)


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    limit: int | None = None,
    **options,
) -> Dataset:
    """Load ``split`` ('train' or 'test') of dataset ``name`` into memory (CPU)."""
    check_dataset(name)
    if data_dir is not None and not download and not Path(data_dir).is_dir():
        raise CamkdError(f"--data-dir {data_dir} does not exist; give the folder that holds the {name} files (or add --download)")
    if split not in ("train", "test"):
        raise CamkdError(f"unknown split '{split}'; choose train or test")
    ds = DATASETS.get(name)(split=split, data_dir=Path(data_dir) if data_dir else None, download=download, **options)
    return ds.limit(limit)


def load_split(
    name: str, split: str, *, device: torch.device | str = "cpu", data_dir: str | Path | None = None,
    download: bool = False, limit: int | None = None, **options,
) -> Dataset:
    """:func:`load_dataset` then one move to ``device``; the fingerprint is computed on the CPU copy first."""
    ds = load_dataset(name, split, data_dir=data_dir, download=download, limit=limit if split == "train" else None, **options)
    ds.fingerprint  # noqa: B018 - computed on CPU, before the move
    return ds.to(device)
