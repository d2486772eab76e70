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

from camkd.data.base import register_dataset
from camkd.data.inmemory import Dataset
from camkd.data.norm import Normalization
from camkd.device import free_memory
from camkd.errors import CamkdError
from camkd.words import human, plural

SYNTH_NORM = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def make_synthetic(
    *, split: str, num_samples: int, num_classes: int = 10, image_size: int = 32, channels: int = 3, noise: float = 40.0
) -> Dataset:
    """Build ``num_samples`` images of ``num_classes`` classes; train and test differ only in their noise."""
    check_generated_size(num_samples, channels, image_size)
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


GENERATION_BYTES = 8 * 2 + 1  # per value: the float64 noise, the float64 sum, the uint8 image kept


def check_generated_size(num_samples: int, channels: int, image_size: int) -> None:
    """Refuse (one CamkdError, before any array is made) a set whose generation cannot fit the free host memory: the
    whole set is made in memory at once (``--image-size 100000`` asked for hundreds of TB)."""
    need = num_samples * channels * image_size * image_size * GENERATION_BYTES
    free = free_memory(torch.device("cpu"))
    if free is not None and need > free[0]:
        raise CamkdError(f"--image-size {image_size}: making the synthetic set ({plural(num_samples, 'image')} of "
                         f"{channels} x {image_size} x {image_size} px, in memory at once) needs about {human(need)}, more "
                         f"than the {human(free[0])} of {free[1]}; lower --image-size")


@register_dataset("synthetic", kind="generated")
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
