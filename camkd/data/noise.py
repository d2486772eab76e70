"""Symmetric label noise for teacher training: a recorded fraction of labels moved to another class.

``train-teacher --label-noise RATE --label-noise-seed S`` replaces exactly ``round(RATE * N)`` of
the N training labels, each by a class drawn uniformly from the *other* classes. Which samples
and which new classes come from one ``numpy.random.default_rng(S)``, in that order, so a rate,
a seed and the data give the same labels on every machine. The test split stays clean.
"""

from __future__ import annotations

import numpy as np
import torch

from camkd.data.inmemory import Dataset
from camkd.errors import CamkdError


def check_rate(rate: float) -> None:
    """Refuse a rate outside [0, 1) before anything loads."""
    if not (0.0 <= rate < 1.0):
        raise CamkdError(f"--label-noise must be a fraction in [0, 1) (e.g. 0.4 for 40 % of the labels), got {rate}")


def noisy_labels(labels: np.ndarray, num_classes: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(new labels, sorted indices changed)``: ``round(rate * N)`` labels each moved to a uniformly chosen other class."""
    check_rate(rate)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    m = int(round(rate * n))
    if m and num_classes < 2:
        raise CamkdError("--label-noise needs at least 2 classes (a label can only move to another class)")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=m, replace=False)) if m else np.zeros(0, dtype=np.int64)
    shift = rng.integers(1, num_classes, size=m) if m else np.zeros(0, dtype=np.int64)  # 1..C-1: never the same class
    out = labels.copy()
    out[idx] = (labels[idx] + shift) % num_classes
    return out, idx


def apply_label_noise(ds: Dataset, rate: float, seed: int) -> tuple[Dataset, dict | None]:
    """``ds`` with noisy labels (on the same device) and the record for the checkpoint; rate 0: ``ds`` itself and None."""
    check_rate(rate)
    if rate == 0:
        return ds, None
    new, idx = noisy_labels(ds.labels.cpu().numpy(), ds.num_classes, rate, seed)
    noisy = Dataset(ds.name, ds.split, ds.images, torch.from_numpy(new).to(ds.labels.device), ds.num_classes, ds.norm)
    return noisy, {"rate": rate, "seed": seed, "changed": int(len(idx)), "n": len(ds)}
