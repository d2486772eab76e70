"""The 32-px recipe: seeded crop-and-flip views, parameters a pure function of (seed, view, index).

The recipe is the reference's (RepDistiller/CA-MKD CIFAR training transform):
``RandomCrop(size, padding=4)`` with zero padding, ``RandomHorizontalFlip(0.5)``,
then ``ToTensor`` + per-channel ``Normalize``. Fashion-MNIST (28 px) uses the same
recipe at its own size: 4-pixel zero padding, a 28-pixel crop (offsets 0..8 on each
axis) and a horizontal flip. Flipped garments are still garments of the same class.

Parameters come from the counter hash (:mod:`camkd.data.counter`, fields ``CROP_DX``, ``CROP_DY``,
``CROP_FLIP``): no global RNG state, so the same (seed, view, i) gives the same parameters whatever
the batch, order, process or device. They are applied batched with one gather on the device; the
gather only copies bytes, and the normalization is IEEE elementwise arithmetic, so the augmented
image is bit-identical wherever it is computed.

A training epoch copies nothing from the host per step (:class:`EpochRows`, :class:`EpochParams`): a process's rows of
the epoch's batches are one array and their parameters one tensor, both computed once on the host and copied to the
device once (from pinned memory, without blocking, on CUDA: a copy from pageable memory waits for every queued kernel,
so the host could not queue step k + 1 while the device runs step k); each step takes slices of the device copies,
and the per-step view check reads the host copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from camkd.data.augspec import CROP_RECIPE, AugSpec
from camkd.data.counter import CROP_DX, CROP_DY, CROP_FLIP, hash_counter
from camkd.data.norm import normalize

RECIPE = CROP_RECIPE  # this recipe's name, as stores record it (AugSpec's default)


def view_params(spec: AugSpec, view: int, indices: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Augmentation parameters [n, 3] int16 (dx, dy, flip) for samples ``indices`` in ``view`` (CPU)."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and idx.min() < 0:
        raise ValueError("sample indices must be non-negative")
    span = np.uint64(2 * spec.padding + 1)
    dx = hash_counter(spec.seed, view, idx, CROP_DX) % span
    dy = hash_counter(spec.seed, view, idx, CROP_DY) % span
    flip = hash_counter(spec.seed, view, idx, CROP_FLIP) >> np.uint64(63)
    return torch.from_numpy(np.stack([dx, dy, flip], axis=1).astype(np.int16))


def apply_params(images: torch.Tensor, params: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Crop and flip a uint8 batch [B, C, H, W] by ``params`` [B, 3]; returns uint8 on the images' device."""
    b, c, h, w = images.shape
    dev = images.device
    params = params.to(device=dev, dtype=torch.int64)
    padded = F.pad(images, (padding, padding, padding, padding))  # zeros, as RandomCrop(padding=4)
    dx, dy, flip = params[:, 0:1], params[:, 1:2], params[:, 2:3]
    ar_h = torch.arange(h, device=dev).unsqueeze(0)
    ar_w = torch.arange(w, device=dev).unsqueeze(0)
    rows = dy + ar_h  # [B, H]
    cols = dx + torch.where(flip.bool(), (w - 1) - ar_w, ar_w)  # [B, W]; flipping the crop == cropping then flipping
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def augment(images: torch.Tensor, indices: np.ndarray | torch.Tensor, spec: AugSpec, view: int, *,
            on_device: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of samples ``indices`` of the whole uint8 set ``images`` in ``view``.

    ``on_device``: the same indices already on the images' device (saves a second copy).
    Returns (normalized float32 images on the images' device, the int16 params used, on CPU).
    """
    params = view_params(spec, view, indices)
    if on_device is None:
        on_device = torch.as_tensor(indices).to(images.device)
    return normalize(apply_params(images[on_device], params, spec.padding), spec.norm), params


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor ``t`` on ``device`` (itself where it is there already): on CUDA from pinned memory and
    ``non_blocking``, so the host does not wait for the kernels queued before the copy (the pinned buffer is held by
    torch's caching host allocator until the copy has run)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class EpochRows(Sequence[np.ndarray]):
    """One process's rows of an epoch's index batches, held as one int64 array (``indices``): batch k is the slice
    ``rows(k)`` of it (``self[k]``, a numpy view). :meth:`on` copies the whole array to a device once, so each step's
    indices on the device are a slice of that one copy, not a copy of their own.

    It is what the training loop passes to a split's ``view_batches`` (an ``Iterable`` of index batches like any
    other): the in-memory split slices it per step; an image folder iterates it batch by batch, since its workers
    decode each batch and its images and boxes already arrive per batch (pinned by its DataLoader)."""

    def __init__(self, batches: Iterable[Sequence[int]]) -> None:
        arrays = [np.asarray(b, dtype=np.int64).reshape(-1) for b in batches]
        self.indices: np.ndarray = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        self.bounds: tuple[int, ...] = tuple(int(b) for b in np.cumsum([0] + [len(a) for a in arrays]))
        self._on: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def of(cls, batches: Iterable[Sequence[int]]) -> EpochRows:
        """``batches`` as :class:`EpochRows` (themselves when they are already)."""
        return batches if isinstance(batches, EpochRows) else cls(batches)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def rows(self, k: int) -> slice:
        """Where batch ``k`` lies in :attr:`indices` (and in every per-row array of the epoch)."""
        if not 0 <= k < len(self):
            raise IndexError(k)
        return slice(self.bounds[k], self.bounds[k + 1])

    def __getitem__(self, k: int) -> np.ndarray:  # type: ignore[override]
        return self.indices[self.rows(k)]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[k] for k in range(len(self)))

    def on(self, device: torch.device) -> torch.Tensor:
        """All the rows on ``device``, copied once (later calls return the same tensor)."""
        if device not in self._on:
            self._on[device] = to_device(torch.from_numpy(self.indices), device)
        return self._on[device]


@dataclass(frozen=True)
class EpochParams:
    """The view parameters of an epoch's rows, computed once: ``host`` (int16 [n, 3], on the CPU: what the per-step
    view check compares with a store's ``aug``) and ``on_device`` (its one copy, int64 as :func:`apply_params` takes
    it, so a step's slice needs neither a copy nor a cast)."""

    host: torch.Tensor
    on_device: torch.Tensor

    @classmethod
    def of(cls, spec: AugSpec, view: int, rows: EpochRows, device: torch.device) -> EpochParams:
        host = view_params(spec, view, rows.indices)
        return cls(host, to_device(host, device).to(torch.int64))

    def views(self, images: torch.Tensor, rows: EpochRows, padding: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each batch of ``rows`` of the uint8 set ``images`` cropped and flipped (uint8, on the images' device), with
        its host parameters: one gather per step from slices of the epoch's device copies; nothing copied per step."""
        on = rows.on(images.device)
        for k in range(len(rows)):
            s = rows.rows(k)
            yield apply_params(images[on[s]], self.on_device[s], padding), self.host[s]
