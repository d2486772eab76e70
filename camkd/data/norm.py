"""Per-channel normalization: what a split records of its statistics, and the one place it is applied.

Every kind of data (in memory or image folders) hands out uint8 images and normalizes them on the device, here,
for training, caching, verifying and evaluating alike; ``x / 255`` then ``(x - mean) / std`` is IEEE elementwise
arithmetic (every divisor a tensor on the images' device: see :func:`normalize`), so the float input is bit-identical
wherever it is computed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std applied after ``x / 255`` (as torchvision's ToTensor + Normalize)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}


def normalize(images: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 normalized, as ToTensor (x / 255) then Normalize ((x - m) / s)."""
    x = images.to(torch.float32, copy=True)  # in place below: one float batch allocated
    full, mean, std = _norm_tensors(tuple(norm.mean), tuple(norm.std), x.device)
    # 255 as a tensor on x's device, not a Python number: CUDA divides by a host scalar as a * (1 / b) (torch's
    # div_true_kernel_cuda, "may lose one bit": 126 of the 256 byte values differ), by a device tensor truly, as the CPU
    return x.div_(full).sub_(mean).div_(std)


@functools.cache
def _norm_tensors(mean: tuple[float, ...], std: tuple[float, ...],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """255 (a 0-d float32 tensor), the mean and the std as float32 [1, C, 1, 1], on ``device``, made once per
    (normalization, device): no host-to-device copy per batch. Ordinary tensors even when first asked for under
    inference mode (they serve training steps too)."""
    with torch.inference_mode(False):
        return (torch.tensor(255.0, dtype=torch.float32, device=device),
                torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
                torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1))
