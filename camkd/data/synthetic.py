"""A deterministic, learnable toy dataset for tests and demos.

Each class has a fixed prototype: a colour per channel and a horizontal stripe pattern
(invariant to horizontal flips, robust to 4-pixel shifts). A sample is its class
prototype plus per-sample noise. Everything derives from numpy's PCG64 with fixed seeds,
so the bytes are the same on every machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from camkd.data.base import Dataset, Normalization, register_dataset

SYNTH_NORM = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def make_synthetic(
    *, split: str, num_samples: int, num_classes: int = 10, image_size: int = 32, channels: int = 3, noise: float = 40.0
) -> Dataset:
    """Build ``num_samples`` images of ``num_classes`` classes; train and test differ only in their noise."""
    proto_rng = np.random.default_rng(12345 + 1000 * num_classes + channels)
    colour = proto_rng.uniform(60, 200, size=(num_classes, channels, 1, 1))
    freq = proto_rng.uniform(0.3, 1.6, size=(num_classes, 1, 1, 1))
    phase = proto_rng.uniform(0, 2 * np.pi, size=(num_classes, 1, 1, 1))
    amp = proto_rng.uniform(25, 55, size=(num_classes, channels, 1, 1))
    rows = np.arange(image_size, dtype=np.float64).reshape(1, 1, image_size, 1)
    protos = colour + amp * np.sin(freq * rows + phase)  # [K, C, H, 1]
    protos = np.broadcast_to(protos, (num_classes, channels, image_size, image_size))

    rng = np.random.default_rng({"train": 1, "test": 2}[split] * 7919 + num_samples)
    labels = rng.integers(0, num_classes, size=num_samples)
    imgs = protos[labels] + rng.normal(0.0, noise, size=(num_samples, channels, image_size, image_size))
    imgs = np.clip(np.rint(imgs), 0, 255).astype(np.uint8)
    norm = SYNTH_NORM if channels == 3 else Normalization((0.5,) * channels, (0.25,) * channels)
    return Dataset("synthetic", split, torch.from_numpy(imgs), torch.from_numpy(labels.astype(np.int64)), num_classes, norm)


@register_dataset("synthetic")
def synthetic(
    *,
    split: str,
    data_dir: Path | None = None,
    download: bool = False,
    num_samples: int | None = None,
    num_classes: int = 10,
    image_size: int = 32,
    channels: int = 3,
) -> Dataset:
    n = num_samples if num_samples is not None else (1024 if split == "train" else 256)
    return make_synthetic(split=split, num_samples=n, num_classes=num_classes, image_size=image_size, channels=channels)
