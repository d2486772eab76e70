"""Image folders as a dataset split: a file listing whose images are decoded in worker processes.

:class:`FolderDataset` is the second implementation of :class:`camkd.data.base.DataSplit` (the first,
``inmemory.py``, holds uint8 images in memory). It holds a :class:`~camkd.data.listing.Listing` (relative path,
byte size, label per sample; nothing decoded) and an image size. Training views come from ``rrc.py``'s
RandomResizedCrop box and flip of (aug seed, view, index, the image's size) and
:func:`camkd.data.decode.train_view_into` (Pillow's one decode + crop + resize path), with the CRC-32 of the uint8
view, all computed in a worker a batch at a time; evaluation images are :func:`~camkd.data.decode.eval_view_into`'s
resize to round(size / 0.875) + centre crop. A torch DataLoader runs the workers (started with "spawn": zarr's event
loop and CUDA do not survive fork; persistent across epochs), uint8 batches go through pinned memory to the device,
and normalization happens there (``norm.normalize``).

Registered names: ``imagefolder`` (ImageNet's layout, ``--image-size`` 224 by default) and
``tinyimagenet`` (tiny-imagenet-200 as distributed, 64 by default), both with ImageNet's statistics.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from camkd.data.augspec import AugSpec
from camkd.data.base import SplitOptions, ViewBatch, register_dataset
from camkd.data.decode import (
    DECODER,
    INTERPOLATIONS,
    decoder_versions,
    eval_view_into,
    open_image,
    pixel_hashes,
    train_view_into,
)
from camkd.data.listing import LISTERS, Listing
from camkd.data.norm import Normalization
from camkd.data.rrc import PARAMS, RECIPE, rrc_boxes
from camkd.errors import CamkdError

IMAGENET_NORM = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DEFAULT_SIZE = {"imagefolder": 224, "tinyimagenet": 64}
FOLDER_DATASETS = tuple(DEFAULT_SIZE)  # the names whose data are files (the others are in memory)
_EVAL = -1  # the view number of an evaluation image in a worker's key
_OPEN_AT_ONCE = 64  # files a worker holds open while it makes a batch


def default_workers() -> int:
    """Decoding workers when --workers is not given: the CPUs this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@dataclass(frozen=True)
class Undecodable:
    """A file a worker could not decode, returned in place of its batch. Why a result, not an exception: the
    DataLoader re-raises a worker's exception as a new one made from its traceback's text, so the file and the reason
    would have to be parsed back out of that text; a result reaches the main process as it was made, which raises
    :meth:`error` (one line, the same with or without workers)."""

    path: str
    reason: str

    def error(self) -> CamkdError:
        return CamkdError(f"cannot decode {self.path}: {self.reason}; fix or remove the file")


class _Unreadable(Exception):
    """Raised inside a worker's batch where a file cannot be decoded; ``__getitems__`` turns it into :class:`Undecodable`."""

    def __init__(self, failure: Undecodable) -> None:
        super().__init__(failure.path)
        self.failure = failure


Made = tuple[torch.Tensor, torch.Tensor, torch.Tensor] | Undecodable  # what a worker returns for a batch of keys


class _Images(torch.utils.data.Dataset):
    """What a worker process holds: the files and the size. An item is keyed by (aug seed, view, index);
    view -1 is the evaluation image. A batch of keys gives (uint8 [B, 3, S, S], params int32 [B, 5], CRC-32s as
    int64 [B]), or :class:`Undecodable` where a file cannot be decoded, made whole in the worker (``__getitems__``,
    which the DataLoader calls with a batch's keys): the boxes of a batch come from one :func:`rrc_boxes` call on
    the images' header sizes, every view is written into the batch's one array (in shared memory in a worker, so it
    reaches the main process without another copy), and there is no per-sample tensor and no collation copy."""

    def __init__(self, files: list[str], size: int, eval_resize: tuple[int, str] | None = None) -> None:
        self.files, self.size = files, size
        # evaluation's (resize, interpolation) when not the default round(size / 0.875) bilinear
        self.eval_kw = {} if eval_resize is None else {"resize": eval_resize[0], "interpolation": eval_resize[1]}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        made = self.__getitems__([key])
        if isinstance(made, Undecodable):
            raise made.error()
        x, params, crc = made
        return x[0], params[0], crc[0]

    def __getitems__(self, keys: Sequence[tuple[int, int, int]]) -> Made:
        n, s = len(keys), self.size
        x = torch.empty((n, 3, s, s), dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            x.share_memory_()
        out, params = x.numpy(), np.zeros((n, len(PARAMS)), dtype=np.int32)
        try:
            for lo in range(0, n, _OPEN_AT_ONCE):  # bounded open files for any batch size
                self._views(keys[lo : lo + _OPEN_AT_ONCE], out[lo : lo + _OPEN_AT_ONCE], params[lo : lo + _OPEN_AT_ONCE])
        except _Unreadable as e:
            return e.failure
        return x, torch.from_numpy(params), torch.from_numpy(pixel_hashes(out).astype(np.int64))

    def _views(self, keys: Sequence[tuple[int, int, int]], out: np.ndarray, params: np.ndarray) -> None:
        with contextlib.ExitStack() as stack:
            imgs = []
            for _, _, index in keys:
                with self._named(index):
                    imgs.append(stack.enter_context(open_image(self.files[index])))
            groups: dict[tuple[int, int], list[int]] = {}
            for row, (seed, view, _) in enumerate(keys):
                if view != _EVAL:
                    groups.setdefault((seed, view), []).append(row)
            for (seed, view), rows in groups.items():
                widths, heights = np.array([imgs[r].size for r in rows], dtype=np.int64).T
                boxes, flips = rrc_boxes(seed, view, np.array([keys[r][2] for r in rows]), heights, widths)
                params[rows, :4], params[rows, 4] = boxes, flips
            for row, ((_, view, index), img) in enumerate(zip(keys, imgs)):
                with self._named(index):
                    if view == _EVAL:
                        eval_view_into(img, self.size, out[row], **self.eval_kw)
                    else:
                        train_view_into(img, params[row, :4], int(params[row, 4]), self.size, out[row])

    @contextlib.contextmanager
    def _named(self, index: int) -> Iterator[None]:
        try:
            yield
        except (OSError, ValueError) as e:
            raise _Unreadable(Undecodable(self.files[index], str(e))) from None


def _batch(made: Made) -> Made:
    """The DataLoader's collate_fn: ``_Images.__getitems__`` already made the batch."""
    return made


class Replay(torch.utils.data.Sampler):
    """A DataLoader's ``batch_sampler`` that reads the batches set before each pass, so one loader and its
    (persistent, spawn-started) workers serve every pass: ``replay.batches = [...]`` then iterate the loader.
    Here a batch is a list of (view, index, seed) keys; the data benchmark replays plain indices through it."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def __iter__(self) -> Iterator[list]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class FolderDataset:
    """One split of an image-folder dataset (a :class:`~camkd.data.base.DataSplit`): files, decoded by workers."""

    name: str
    split: str
    listing: Listing
    labels: torch.Tensor  # int64 [N]
    num_classes: int
    norm: Normalization
    size: int
    workers: int
    _loader: DataLoader | None = field(default=None, repr=False, compare=False)
    _keys: Replay = field(default_factory=Replay, repr=False, compare=False)
    reopen: SplitOptions | None = field(default=None, repr=False, compare=False)  # set by load_dataset
    eval_resize: tuple[int, str] | None = None  # evaluation's (resize, interpolation); None: round(size / 0.875) bilinear

    @classmethod
    def of(cls, listing: Listing, size: int, workers: int) -> FolderDataset:
        labels = torch.from_numpy(np.array(listing.labels, dtype=np.int64))
        return cls(listing.name, listing.split, listing, labels, listing.num_classes, IMAGENET_NORM, size, workers)

    def __len__(self) -> int:
        return len(self.listing)

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def image_size(self) -> int:
        return self.size

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class folders' names, in label order (sorted)."""
        return self.listing.classes

    @property
    def fingerprint(self) -> str:
        """The listing's fingerprint (paths, byte sizes, labels) and the image size."""
        return hashlib.sha256(f"{self.listing.fingerprint}|{self.size}".encode()).hexdigest()

    def _with(self, listing: Listing, labels: torch.Tensor) -> FolderDataset:
        return FolderDataset(self.name, self.split, listing, labels, self.num_classes, self.norm, self.size, self.workers,
                             reopen=self.reopen, eval_resize=self.eval_resize)

    def with_eval(self, crop: int, resize: int, interpolation: str = "bilinear") -> FolderDataset:
        """A copy evaluated as ``Resize(resize, interpolation)`` + ``CenterCrop(crop)`` (a published model's eval
        transform) instead of the default resize to round(size / 0.875) bilinear; ``crop`` becomes the image size."""
        check_size(crop)
        if resize < crop:
            raise CamkdError(f"--resize {resize} is smaller than the centre crop {crop}: the crop must lie inside the resized image")
        if interpolation not in INTERPOLATIONS:
            raise CamkdError(f"unknown interpolation {interpolation!r}; choose {' or '.join(INTERPOLATIONS)}")
        return replace(self, size=crop, eval_resize=(resize, interpolation), _loader=None, _keys=Replay())

    @property
    def eval_geometry(self) -> tuple[int, int, str]:
        """(crop, resize, interpolation) of this split's evaluation images."""
        if self.eval_resize is None:
            return self.size, round(self.size / 0.875), "bilinear"
        return self.size, *self.eval_resize

    def limit(self, n: int | None) -> FolderDataset:
        """The first ``n`` files (all when None); the classes stay whole."""
        if n is None or n == len(self):
            return self
        listing = self.listing.limit(n)
        return self._with(listing, self.labels[: len(listing)].clone())

    def to(self, device: torch.device | str) -> FolderDataset:
        """The labels on ``device`` (the images are read from the files, batch by batch)."""
        return self._with(self.listing, self.labels.to(device))

    def subset(self, lo: int, hi: int) -> FolderDataset:
        """Files lo..hi-1."""
        ls = self.listing
        part = Listing(ls.name, ls.root, ls.split, ls.paths[lo:hi], ls.sizes[lo:hi], ls.labels[lo:hi], ls.classes)
        return self._with(part, self.labels[lo:hi])

    def aug_spec(self, seed: int) -> AugSpec:
        """RandomResizedCrop + flip (rrc.py) seeded by ``seed``, ImageNet's normalization."""
        return AugSpec(seed=seed, norm=self.norm, padding=0, recipe=RECIPE)

    def sample_name(self, i: int) -> str:
        """Sample ``i``'s file, relative to the dataset folder."""
        return self.listing.paths[i]

    def store_attrs(self) -> dict:
        """The data kind, the decoder and the versions of what touches the pixels, the classes (by folder name), and
        whether the store holds every file of the folder (no --limit: files added later are refused, not left out)."""
        return {"data_kind": "files", "decoder": DECODER, "decoder_versions": decoder_versions(),
                "classes": list(self.listing.classes), "folder_whole": self.listing.whole}

    def store_arrays(self) -> dict[str, np.ndarray]:
        """The file listing: relative path, byte size, label per sample."""
        ls = self.listing
        return {"path": np.array(ls.paths, dtype=np.dtypes.StringDType()), "size": np.asarray(ls.sizes, dtype=np.int64),
                "label": np.asarray(ls.labels, dtype=np.int64)}

    def loader(self, device: torch.device, batches: int) -> DataLoader:
        """The DataLoader of this split for a pass of ``batches`` batches: made on first use with at most one worker
        per batch, its workers persisting across passes; made again, with more workers (up to ``workers``), only for a
        longer pass. A worker that would get no batch is not started: a spawned worker takes seconds of CPU to start
        (it imports torch), and one that outlives the pass that started it (an evaluation of fewer batches than
        workers) would take them from the training that follows."""
        w = min(self.workers, batches)
        if self._loader is None or self._loader.num_workers < w:
            files = [self.listing.file(i) for i in range(len(self))]
            images = _Images(files, self.size, self.eval_resize)
            self._loader = DataLoader(images, batch_sampler=self._keys, collate_fn=_batch, num_workers=w,
                                      pin_memory=device.type == "cuda", persistent_workers=w > 0,
                                      multiprocessing_context="spawn" if w > 0 else None)
        return self._loader

    def _read(self, keys: list[list[tuple[int, int, int]]], device: torch.device) -> Iterator[ViewBatch]:
        loader = self.loader(device, len(keys))
        self._keys.batches = keys
        for made in loader:
            if isinstance(made, Undecodable):
                raise made.error()
            x, params, crc = made
            yield x.to(device, non_blocking=True), params, crc.numpy().astype(np.uint32)

    def view_batches(self, spec: AugSpec, view: int, index_batches: Iterable[Sequence[int]],
                     device: torch.device) -> Iterator[ViewBatch]:
        """The training views of each batch, decoded and cropped by the workers, with their boxes and CRC-32s."""
        keys = [[(spec.seed, view, int(i)) for i in idx] for idx in index_batches]
        return self._read(keys, device)

    def eval_batches(self, batch_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Resize to round(size / 0.875) (or ``eval_resize``'s) and centre-crop ``size``, by the workers."""
        keys = [[(0, _EVAL, i) for i in range(s, min(s + batch_size, len(self)))] for s in range(0, len(self), batch_size)]
        for (x, _, _), k in zip(self._read(keys, device), keys):
            yield x, self.labels[k[0][2] : k[-1][2] + 1].to(device)


def check_size(size: int) -> None:
    if size < 1:
        raise CamkdError(f"--image-size must be at least 1 pixel, got {size}")


def check_workers(workers: int) -> None:
    if workers < 0:
        raise CamkdError(f"--workers must be 0 (decode in this process) or more, got {workers}")


def load_folder(name: str, split: str, data_dir: Path | None, image_size: int | None, workers: int | None) -> FolderDataset:
    """List ``split`` of the folder dataset ``name`` under ``data_dir`` (nothing is decoded)."""
    if data_dir is None:
        raise CamkdError(f"--dataset {name} reads image files: give --data-dir, the folder that holds train/ and val/")
    size = DEFAULT_SIZE[name] if image_size is None else image_size
    check_size(size)
    workers = default_workers() if workers is None else workers
    check_workers(workers)
    return FolderDataset.of(LISTERS[name](data_dir, split), size, workers)


@register_dataset("imagefolder", kind="files")
def imagefolder(*, split: str, data_dir: Path | None, download: bool = False, image_size: int | None = None,
                workers: int | None = None) -> FolderDataset:
    """ImageNet's layout: ROOT/train/CLASS/* and ROOT/val/CLASS/*, classes by sorted folder name."""
    _no_download(download, "imagefolder")
    return load_folder("imagefolder", split, data_dir, image_size, workers)


@register_dataset("tinyimagenet", kind="files")
def tinyimagenet(*, split: str, data_dir: Path | None, download: bool = False, image_size: int | None = None,
                 workers: int | None = None) -> FolderDataset:
    """tiny-imagenet-200 as distributed (wnids.txt, train/WNID/images/*, val/images/* + val_annotations.txt)."""
    _no_download(download, "tinyimagenet")
    return load_folder("tinyimagenet", split, data_dir, image_size, workers)


def _no_download(download: bool, name: str) -> None:
    if download:
        raise CamkdError(f"--download does not fetch {name}; download it yourself and give --data-dir")
