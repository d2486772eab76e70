"""Datasets as uint8 tensors in memory: one load, then batches are index slices.

Every loader returns a :class:`Dataset` (images [N, C, H, W] uint8, labels [N] int64).
Names: ``cifar100``, ``cifar10``, ``fashion-mnist``, ``synthetic``; importing this package
registers them all (one import line per loader module below).
"""

from __future__ import annotations

from camkd.data import cifar, fashion_mnist, synthetic  # noqa: F401 - registration happens on import
from camkd.data.base import DATASETS, Dataset, DataSplit, Normalization, check_dataset, dataset_names, load_dataset, load_split

__all__ = ["DATASETS", "DataSplit", "Dataset", "Normalization", "check_dataset", "dataset_names", "load_dataset", "load_split"]
