"""Datasets: uint8 tensors in memory (batches are index slices) or image folders (decoded by workers).

Every loader returns a :class:`DataSplit`: an in-memory :class:`Dataset` (images [N, C, H, W] uint8, labels [N]
int64) or a ``FolderDataset``.
Names: ``cifar100``, ``cifar10``, ``fashion-mnist``, ``synthetic`` (in memory) and ``imagefolder``,
``tinyimagenet`` (files, folder.py); importing this package registers them all.
"""

from __future__ import annotations

from camkd.data import cifar, fashion_mnist, folder, synthetic  # noqa: F401 - registration happens on import
from camkd.data.base import DATASETS, DataSplit, SplitOptions, check_dataset, dataset_kind, dataset_names, load_dataset, load_split
from camkd.data.inmemory import Dataset
from camkd.data.norm import Normalization

__all__ = ["DATASETS", "DataSplit", "Dataset", "Normalization", "SplitOptions", "check_dataset", "dataset_kind", "dataset_names",
           "load_dataset", "load_split"]
