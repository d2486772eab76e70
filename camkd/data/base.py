"""The one interface of a dataset split (:class:`DataSplit`), and the name -> loader registry.

Two kinds of split implement :class:`DataSplit`: :class:`camkd.data.inmemory.Dataset` (uint8 images [N, C, H, W]
in memory, a batch is one gather on the device) and :class:`camkd.data.folder.FolderDataset` (a file listing,
images decoded in worker processes). The training loop, the teacher sources, the store and evaluation use only the
interface; this module imports no implementation (the loaders register themselves, see ``camkd/data/__init__.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from camkd.data.augspec import AugSpec
from camkd.data.norm import Normalization
from camkd.errors import CamkdError
from camkd.registry import Registry

# one training batch: (uint8 views [B, C, S, S] on the device, augmentation params [B, P] on the CPU,
# CRC-32 of each view (np.uint32 [B]) or None where the views are not decoded from files)
ViewBatch = tuple[torch.Tensor, torch.Tensor, "np.ndarray | None"]


class DataSplit(Protocol):
    """One split of a dataset, as every job uses it: in memory (``inmemory.Dataset``) or files (``folder.FolderDataset``)."""

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
