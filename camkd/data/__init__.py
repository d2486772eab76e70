"""Datasets as uint8 tensors in memory: one load, then batches are index slices.

Every loader returns a :class:`Dataset` (images [N, C, H, W] uint8, labels [N] int64).
Names: ``cifar100``, ``cifar10``, ``fashion-mnist``, ``synthetic``.
"""

from __future__ import annotations

from camkd.data.base import DATASETS, Dataset, Normalization, check_dataset, dataset_names, load_dataset, load_split

__all__ = ["DATASETS", "Dataset", "Normalization", "check_dataset", "dataset_names", "load_dataset", "load_split"]
