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
"""

from __future__ import annotations

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
