"""The in-memory split (:class:`Dataset`): uint8 images [N, C, H, W] held whole, a batch one gather on the device.

The first implementation of :class:`camkd.data.base.DataSplit` (``folder.py`` is the second), with its augmentation,
the 32-px recipe of ``views.py`` (pad 4, crop, flip), as ``folder.py``'s is ``rrc.py``. The CIFAR, Fashion-MNIST and
synthetic loaders make one; no DataLoader: the split sits in memory and a batch is one gather (airbench's data path).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from camkd.data.augspec import AugSpec
from camkd.data.base import SplitOptions, ViewBatch, limits
from camkd.data.norm import Normalization
from camkd.data.views import EpochParams, EpochRows


@dataclass
class Dataset:
    """One split of a dataset, whole in memory (a :class:`~camkd.data.base.DataSplit`)."""

    name: str
    split: str
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    num_classes: int
    norm: Normalization
    _fingerprint: str | None = field(default=None, repr=False)
    reopen: SplitOptions | None = field(default=None, repr=False, compare=False)  # set by load_dataset

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
    def class_names(self) -> None:
        """Arrays name no classes (their labels are numbers)."""
        return None

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
        return Dataset(self.name, self.split, self.images[:n].clone(), self.labels[:n].clone(), self.num_classes, self.norm,
                       reopen=self.reopen)

    def to(self, device: torch.device | str) -> Dataset:
        """Move images and labels to ``device`` once; the fingerprint is kept."""
        return Dataset(
            self.name, self.split, self.images.to(device), self.labels.to(device), self.num_classes, self.norm, self._fingerprint,
            reopen=self.reopen,
        )

    def subset(self, lo: int, hi: int) -> Dataset:
        """Samples lo..hi-1, sharing the images (views, not copies)."""
        return Dataset(self.name, self.split, self.images[lo:hi], self.labels[lo:hi], self.num_classes, self.norm,
                       reopen=self.reopen)

    def aug_spec(self, seed: int) -> AugSpec:
        """The 32-px recipe (views.py): pad 4, crop, flip."""
        return AugSpec(seed=seed, norm=self.norm)

    def view_batches(self, spec: AugSpec, view: int, index_batches: Iterable[Sequence[int]],
                     device: torch.device) -> Iterator[ViewBatch]:
        """One gather and crop per batch on the images' device (views.apply_params); no hashes.

        The pass's indices and their view parameters are computed once, on the host, and copied to the images' device
        once (:class:`~camkd.data.views.EpochRows`, whose copy the loop's own is when it passes one, and
        :class:`~camkd.data.views.EpochParams`); each batch is a slice of those copies, so no step copies from the
        host. The parameters it yields are slices of the host copy (what a store's view check reads)."""
        rows = EpochRows.of(index_batches)
        return self._views(spec, view, rows, device)

    def _views(self, spec: AugSpec, view: int, rows: EpochRows, device: torch.device) -> Iterator[ViewBatch]:
        params = EpochParams.of(spec, view, rows, self.images.device)
        for images, host in params.views(self.images, rows, spec.padding):
            yield images.to(device), host, None

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
