"""The one interface of a dataset split (:class:`DataSplit`), and the name -> loader registry.

Two kinds of split implement :class:`DataSplit`: :class:`camkd.data.inmemory.Dataset` (uint8 images [N, C, H, W]
in memory, a batch is one gather on the device) and :class:`camkd.data.folder.FolderDataset` (a file listing,
images decoded in worker processes). The training loop, the teacher sources, the store and evaluation use only the
interface; this module imports no implementation (the loaders register themselves, see ``camkd/data/__init__.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
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
    reopen: SplitOptions | None  # how to open this dataset's splits again (set by load_dataset)

    @property
    def fingerprint(self) -> str: ...

    @property
    def in_channels(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The classes' names in label order where the data names them (an image folder's class folders), else None."""

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
        """The uint8 training views of each batch of sample indices, in order (see :data:`ViewBatch`).

        The training loop passes a pass's batches as one :class:`~camkd.data.views.EpochRows` (one host array, copied
        to the device once per epoch); any other iterable of batches is taken too. In memory, the indices and their view
        parameters are copied to the device once per pass and each step slices them (no copy from the host per step);
        an image folder's workers decode batch by batch, so its views and boxes arrive per batch (pinned by the
        DataLoader on CUDA) and it iterates the batches as before."""

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

KINDS = ("files", "arrays", "generated")
"""What a dataset is made of, which decides what ``--data-dir`` is to it and which recipe trains on it: ``files``,
image files read from ``--data-dir`` (required) at any size, trained with torchvision's recipe; ``arrays``, a
dataset's array files loaded whole into memory (``--data-dir`` optional: a default place, or ``--download``), the
reference's 32-px recipe; ``generated``, made in memory (no ``--data-dir``)."""
_KIND: dict[str, str] = {}
RUNTIME_OPTIONS = ("workers",)  # how a split is read, not which images it holds: never part of how it is reopened
SIZE_OPTIONS = ("num_samples",)
"""Loader options that set how many samples a split holds: a store's test split is the dataset's whole test split
at the store's form, without them (as a store made from N generated training samples has always served it)."""
FORM_OPTIONS = (("image_size", "image_size"), ("num_classes", "num_classes"), ("channels", "in_channels"))
"""Loader options that fix the form of a split's images, and the split's attribute that holds the value used (a
default made explicit, so a split reopens at the size it was opened at even if the default changes)."""


def register_dataset(name: str, *, kind: str = "arrays") -> Callable[[Loader], Loader]:
    """Decorator: register a loader ``fn(*, split, data_dir, download, **options) -> Dataset`` under ``name``, a
    dataset of ``kind`` (:data:`KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"dataset kind {kind!r} is not one of {KINDS}")
    _KIND[name] = kind
    return DATASETS.register(name)


def dataset_kind(name: str) -> str:
    """The :data:`KINDS` entry of dataset ``name`` (refused, one line, when the name is unknown)."""
    return _KIND[DATASETS.resolve(name)]


@dataclass(frozen=True)
class SplitOptions:
    """What reopens a dataset's splits as a run saw them: the registered name, what ``--data-dir`` is to it (its
    :data:`KINDS` entry) and the loader options that fix its samples and their form (an image size, a synthetic
    set's classes, channels and size), defaults made explicit. A store and every checkpoint record it, so a reader
    (evaluate, the store's reader) opens the test split with it and asks nothing about which dataset it is."""

    dataset: str
    options: dict
    kind: str = "arrays"

    @property
    def needs_data_dir(self) -> bool:
        return self.kind == "files"

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "kind": self.kind, "options": dict(self.options)}

    @staticmethod
    def from_dict(d: dict) -> SplitOptions:
        return SplitOptions(dataset=d["dataset"], options=dict(d.get("options") or {}), kind=d.get("kind", "arrays"))

    @staticmethod
    def of_form(dataset: str, *, num_classes: int, image_size: int | None, in_channels: int | None) -> SplitOptions:
        """What a store or checkpoint from before ``reopen`` was recorded reopens with, from the data's kind and the
        form it recorded: a generated set's classes, size and channels, an image folder's size, nothing else."""
        kind = dataset_kind(dataset)
        form = {"generated": {"num_classes": num_classes, "image_size": image_size, "channels": in_channels},
                "files": {"image_size": image_size}}.get(kind, {})
        return SplitOptions(dataset=dataset, options=form, kind=kind)

    def load(self, split: str, *, device: torch.device | str = "cpu", data_dir: str | Path | None = None,
             limit: int | None = None, **runtime) -> DataSplit:
        """``split`` opened as recorded; ``runtime``: :data:`RUNTIME_OPTIONS` (how it is read, e.g. ``workers``)."""
        return load_split(self.dataset, split, device=device, data_dir=data_dir, limit=limit, **self.options, **runtime)


def _split_options(name: str, loader: Loader, options: dict, ds: DataSplit) -> SplitOptions:
    taken = inspect.signature(loader).parameters
    kept = {k: v for k, v in options.items() if k not in RUNTIME_OPTIONS}
    kept.update({opt: getattr(ds, attr) for opt, attr in FORM_OPTIONS if opt in taken})
    return SplitOptions(dataset=name, options=kept, kind=dataset_kind(name))


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
        if dataset_kind(name) == "generated":  # made in memory: no files to find
            raise CamkdError("--data-dir does not apply to synthetic data (it is generated, not read from files); drop it")
        raise CamkdError(f"--data-dir {data_dir} does not exist; give the folder that holds the {name} files (or add --download)")
    if split not in ("train", "test"):
        raise CamkdError(f"unknown split '{split}'; choose train or test")
    loader = DATASETS.get(name)
    _check_options(name, loader, options)
    ds = loader(split=split, data_dir=Path(data_dir) if data_dir else None, download=download, **options)
    ds.reopen = _split_options(name, loader, options, ds)
    return ds.limit(limit)


def load_split(
    name: str, split: str, *, device: torch.device | str = "cpu", data_dir: str | Path | None = None,
    download: bool = False, limit: int | None = None, **options,
) -> DataSplit:
    """:func:`load_dataset` then one move to ``device``; the fingerprint is computed on the CPU copy first."""
    ds = load_dataset(name, split, data_dir=data_dir, download=download, limit=limit if split == "train" else None, **options)
    ds.fingerprint  # noqa: B018 - computed on CPU, before the move
    return ds.to(device)
