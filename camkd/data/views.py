"""Seeded augmentation views: parameters are a pure function of (seed, view, index).

The recipe is the reference's (RepDistiller/CA-MKD CIFAR training transform):
``RandomCrop(size, padding=4)`` with zero padding, ``RandomHorizontalFlip(0.5)``,
then ``ToTensor`` + per-channel ``Normalize``. Fashion-MNIST (28 px) uses the same
recipe at its own size: 4-pixel zero padding, a 28-pixel crop (offsets 0..8 on each
axis) and a horizontal flip. Flipped garments are still garments of the same class.

Parameters come from a counter-based hash (splitmix64 over (seed, view, index, field))
computed in numpy uint64 arithmetic, which wraps by definition: no global RNG state,
so the same (seed, view, i) gives the same parameters whatever the batch, order,
process or device. They are applied batched with one gather on the device; the
gather only copies bytes, and the normalization is IEEE elementwise arithmetic, so
the augmented image is bit-identical wherever it is computed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from camkd.data.base import Normalization

RECIPE = "crop-pad4-zero+hflip0.5+normalize"

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def hash_counter(seed: int, view: int, indices: np.ndarray, field: int) -> np.ndarray:
    """64-bit hash of (seed, view, index, field) for each index."""
    key = _mix(np.full(1, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
    key = _mix(key ^ np.uint64(view))
    key = _mix(key ^ np.uint64(field))
    return _mix(key ^ np.asarray(indices, dtype=np.uint64))


def hash_fields(seed: int, view: int, indices: np.ndarray, fields: np.ndarray) -> np.ndarray:
    """:func:`hash_counter` of every index (rows) and field (columns), [n, F] uint64, in one vectorized pass: the
    per-call overhead of numpy, not the arithmetic, dominates for one image's few draws."""
    key = _mix(np.full(1, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
    key = _mix(key ^ np.uint64(view))
    keys = _mix(key ^ np.asarray(fields, dtype=np.uint64))
    return _mix(keys[None, :] ^ np.asarray(indices, dtype=np.uint64).reshape(-1, 1))


@dataclass(frozen=True)
class AugSpec:
    """What makes a set of views: the seed, the recipe, the padding and the normalization."""

    seed: int
    norm: Normalization
    padding: int = 4
    recipe: str = RECIPE

    def to_dict(self) -> dict:
        return {"seed": self.seed, "recipe": self.recipe, "padding": self.padding, "normalization": self.norm.to_dict()}


def view_params(spec: AugSpec, view: int, indices: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Augmentation parameters [n, 3] int16 (dx, dy, flip) for samples ``indices`` in ``view`` (CPU)."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and idx.min() < 0:
        raise ValueError("sample indices must be non-negative")
    span = np.uint64(2 * spec.padding + 1)
    dx = hash_counter(spec.seed, view, idx, 0) % span
    dy = hash_counter(spec.seed, view, idx, 1) % span
    flip = hash_counter(spec.seed, view, idx, 2) >> np.uint64(63)
    return torch.from_numpy(np.stack([dx, dy, flip], axis=1).astype(np.int16))


def normalize(images: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 normalized, as ToTensor (x / 255) then Normalize ((x - m) / s)."""
    x = images.to(torch.float32, copy=True).div_(255.0)  # in place: the same arithmetic, one float batch allocated
    mean, std = _norm_tensors(tuple(norm.mean), tuple(norm.std), x.device)
    return x.sub_(mean).div_(std)


@functools.cache
def _norm_tensors(mean: tuple[float, ...], std: tuple[float, ...],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std as float32 [1, C, 1, 1] on ``device``, made once per (normalization, device): no host-to-device
    copy per batch. Ordinary tensors even when first asked for under inference mode (they serve training steps too)."""
    with torch.inference_mode(False):
        return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
                torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1))


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
