"""The one interface of a dataset split (:class:`DataSplit`), its in-memory implementation, and the name -> loader registry.

Two kinds of split implement :class:`DataSplit`: :class:`Dataset` (uint8 images [N, C, H, W] in memory, a batch
is one gather on the device) and :class:`camkd.data.folder.FolderDataset` (a file listing, images decoded in
worker processes). The training loop, the teacher sources, the store and evaluation use only the interface.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from camkd.errors import CamkdError
from camkd.registry import Registry

if TYPE_CHECKING:
    from camkd.data.views import AugSpec

# one training batch: (uint8 views [B, C, S, S] on the device, augmentation params [B, P] on the CPU,
# CRC-32 of each view (np.uint32 [B]) or None where the views are not decoded from files)
ViewBatch = tuple[torch.Tensor, torch.Tensor, "np.ndarray | None"]


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std applied after ``x / 255`` (as torchvision's ToTensor + Normalize)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}


class DataSplit(Protocol):
    """One split of a dataset, as every job uses it: in memory (:class:`Dataset`) or files (``FolderDataset``)."""

    name: str
    split: str
    labels: torch.Tensor  # int64 [N], on the device the split was moved to
    num_classes: int
    norm: Normalization

    @property
    def fingerprint(self) -> str: ...

    @property
    def in_channels(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    def __len__(self) -> int: ...

    def limit(self, n: int | None) -> DataSplit:
        """The first ``n`` samples (all when None)."""

    def to(self, device: torch.device | str) -> DataSplit:
        """The split with its labels (and images, if held) on ``device``."""

    def subset(self, lo: int, hi: int) -> DataSplit:
        """Samples lo..hi-1 (a rank's slice of the test split)."""

    def aug_spec(self, seed: int) -> AugSpec:
        """The augmentation of this kind of data with views seeded by ``seed``."""

    def view_batches(self, spec: AugSpec, view: int, index_batches: Iterable[Sequence[int]],
                     device: torch.device) -> Iterator[ViewBatch]:
        """The uint8 training views of each batch of sample indices, in order (see :data:`ViewBatch`)."""

    def eval_batches(self, batch_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 un-augmented images on ``device``, their labels) in order, ``batch_size`` at a time."""

    def sample_name(self, i: int) -> str:
        """Sample ``i`` in a message (its file, where it has one)."""

    def store_attrs(self) -> dict:
        """What a store of this data records beside the dataset (and a continuing run must match): none in memory."""

    def store_arrays(self) -> dict[str, np.ndarray]:
        """Per-sample arrays a store of this data keeps beside the labels, by name: none in memory."""


def limits(n: int | None, size: int, name: str, split: str) -> bool:
    """Whether ``--limit n`` cuts a split of ``size`` samples: False for None or the whole split; more than the split
    holds, or not positive, is refused (one line), never capped."""
    if n is None or n == size:
        return False
    if n <= 0:
        raise CamkdError(f"--limit must be positive, got {n}")
    if n > size:
        raise CamkdError(f"--limit {n} is more than the {size} samples of {name}'s {split} split; "
                         f"give at most --limit {size}, or drop --limit to use them all")
    return True


@dataclass
class Dataset:
    """One split of a dataset, whole in memory (a :class:`DataSplit`)."""

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
        if not limits(n, len(self), self.name, self.split):
            return self
        return Dataset(self.name, self.split, self.images[:n].clone(), self.labels[:n].clone(), self.num_classes, self.norm)

    def to(self, device: torch.device | str) -> Dataset:
        """Move images and labels to ``device`` once; the fingerprint is kept."""
        return Dataset(
            self.name, self.split, self.images.to(device), self.labels.to(device), self.num_classes, self.norm, self._fingerprint
        )

    def subset(self, lo: int, hi: int) -> Dataset:
        """Samples lo..hi-1, sharing the images (views, not copies)."""
        return Dataset(self.name, self.split, self.images[lo:hi], self.labels[lo:hi], self.num_classes, self.norm)

    def aug_spec(self, seed: int) -> AugSpec:
        """The 32-px recipe (views.py): pad 4, crop, flip."""
        from camkd.data.views import AugSpec

        return AugSpec(seed=seed, norm=self.norm)

    def view_batches(self, spec: AugSpec, view: int, index_batches: Iterable[Sequence[int]],
                     device: torch.device) -> Iterator[ViewBatch]:
        """One gather and crop per batch on the images' device (views.apply_params), lazily; no hashes."""
        from camkd.data.views import apply_params, view_params

        for idx in index_batches:
            params = view_params(spec, view, idx)
            on_device = torch.as_tensor(np.asarray(idx, dtype=np.int64)).to(self.images.device, non_blocking=True)
            yield apply_params(self.images[on_device], params, spec.padding).to(device), params, None

    def eval_batches(self, batch_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Slices of the images as they are."""
        for start in range(0, len(self), batch_size):
            yield self.images[start : start + batch_size].to(device), self.labels[start : start + batch_size].to(device)

    def sample_name(self, i: int) -> str:
        return f"sample {i}"

    def store_attrs(self) -> dict:
        return {}

    def store_arrays(self) -> dict[str, np.ndarray]:
        return {}


Loader = Callable[..., DataSplit]
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


def _check_options(name: str, loader: Loader, options: dict) -> None:
    """Refuse a loader option (``image_size``, ``workers``, ...) that dataset ``name`` does not take, naming the flag."""
    taken = inspect.signature(loader).parameters
    for key in options:
        if key not in taken:
            flag = "--" + key.replace("_", "-")
            users = [n for n in dataset_names() if key in inspect.signature(DATASETS.get(n)).parameters]
            raise CamkdError(f"{flag} does not apply to {name}" + (f"; it applies to {', '.join(users)}" if users else ""))


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    limit: int | None = None,
    **options,
) -> DataSplit:
    """Load ``split`` ('train' or 'test') of dataset ``name`` into memory (CPU)."""
    check_dataset(name)
    if data_dir is not None and not download and not Path(data_dir).is_dir():
        if name == "synthetic":  # generated in memory: no files to find
            raise CamkdError("--data-dir does not apply to synthetic data (it is generated, not read from files); drop it")
        raise CamkdError(f"--data-dir {data_dir} does not exist; give the folder that holds the {name} files (or add --download)")
    if split not in ("train", "test"):
        raise CamkdError(f"unknown split '{split}'; choose train or test")
    loader = DATASETS.get(name)
    _check_options(name, loader, options)
    ds = loader(split=split, data_dir=Path(data_dir) if data_dir else None, download=download, **options)
    return ds.limit(limit)


def load_split(
    name: str, split: str, *, device: torch.device | str = "cpu", data_dir: str | Path | None = None,
    download: bool = False, limit: int | None = None, **options,
) -> DataSplit:
    """:func:`load_dataset` then one move to ``device``; the fingerprint is computed on the CPU copy first."""
    ds = load_dataset(name, split, data_dir=data_dir, download=download, limit=limit if split == "train" else None, **options)
    ds.fingerprint  # noqa: B018 - computed on CPU, before the move
    return ds.to(device)
