"""Feature-map resizes with a deterministic backward on CUDA: the methods' only resizes.

``torch.use_deterministic_algorithms(True)`` (``--deterministic``) makes the CUDA backward of
``adaptive_avg_pool2d`` (to an output size other than 1) and of ``F.interpolate`` raise (torch's list in
``torch.use_deterministic_algorithms``): both scatter-add into the input's gradient with atomics. The
same maps are written here with ops whose backward is deterministic:

- average pooling (``adaptive_avg_pool2d``'s bins): ``avg_pool2d`` with an integer kernel = stride =
  in / out when both sizes divide (its backward gathers); otherwise the matmul form below;
- the matmul form: both maps are separable, ``y[b, c] = W_h x[b, c] W_w^T`` with ``W_h`` [H, h] and
  ``W_w`` [W, w] the per-axis weights (:func:`pool_weights`, :func:`bilinear_weights`); matmul's
  backward is two more matmuls.

The weights are exactly those of torch's kernels (bins ``[floor(o in / out), ceil((o + 1) in / out))``;
bilinear source index ``(o + 0.5) in / out - 0.5`` clamped at 0, or ``o (in - 1) / (out - 1)`` with
``align_corners``), computed in float64. :class:`Resize` keeps them in float32 as non-persistent buffers: they follow the
module to its device, are graph inputs under ``torch.compile``, and add no key to a checkpoint (a float64 copy
of the module holds float32-rounded weights; the functions give the exact ones). On CUDA the float32 matmuls are
full float32 at torch's default (``torch.backends.cuda.matmul.allow_tf32`` off); under autocast they run in its dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Mode = Literal["pool", "bilinear"]


def pool_weights(n_in: int, n_out: int) -> Tensor:
    """[n_out, n_in] float64: ``adaptive_avg_pool`` along one axis (row o averages its bin of the input)."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        start, end = (o * n_in) // n_out, -((-(o + 1) * n_in) // n_out)  # floor, ceil
        w[o, start:end] = 1.0 / (end - start)
    return w


def bilinear_weights(n_in: int, n_out: int, *, align_corners: bool) -> Tensor:
    """[n_out, n_in] float64: ``F.interpolate(mode="bilinear", size=...)`` along one axis (antialias off).

    torch's ``area_pixel_compute_source_index`` and ``compute_source_index_and_lambda``: the scale is
    in / out (``(in - 1) / (out - 1)`` with ``align_corners``, 0 for one output), the source index is clamped
    at 0 (without ``align_corners``), its floor at in - 1, and the right neighbour is the left one at the edge.
    """
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    if n_in == n_out:
        return torch.eye(n_in, dtype=torch.float64)
    if align_corners:
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
        scale = n_in / n_out
    for o in range(n_out):
        src = scale * o if align_corners else max(scale * (o + 0.5) - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        lam1 = min(max(src - i0, 0.0), 1.0)
        i1 = i0 + (1 if i0 < n_in - 1 else 0)
        w[o, i0] += 1.0 - lam1
        w[o, i1] += lam1
    return w


def resize_weights(src: tuple[int, int], size: tuple[int, int], mode: Mode, *, align_corners: bool = False
                   ) -> tuple[Tensor, Tensor]:
    """The float64 per-axis weights (``W_h`` [H, h], ``W_w`` [W, w]) of a resize from ``src`` to ``size``."""
    if mode == "pool":
        return pool_weights(src[0], size[0]), pool_weights(src[1], size[1])
    return (bilinear_weights(src[0], size[0], align_corners=align_corners),
            bilinear_weights(src[1], size[1], align_corners=align_corners))


def separable(x: Tensor, wh: Tensor, ww: Tensor) -> Tensor:
    """``y[b, c] = wh @ x[b, c] @ ww^T``: x [B, C, h, w], wh [H, h], ww [W, w] -> [B, C, H, W] (matmuls only)."""
    return torch.einsum("oh,bchw,pw->bcop", wh.to(x.dtype), x, ww.to(x.dtype))


class Resize(nn.Module):
    """``x`` [B, C, h, w] -> [B, C, H, W] with ``src = (h, w)`` and ``size = (H, W)`` fixed at construction.

    ``mode="pool"``: ``F.adaptive_avg_pool2d(x, size)`` (needs h >= H and w >= W); ``"bilinear"``:
    ``F.interpolate(x, size, mode="bilinear", align_corners=align_corners)``; equal to them up to float
    rounding, forward and backward, with a deterministic CUDA backward (see the module doc). Same size: identity.
    """

    def __init__(self, src: tuple[int, int], size: tuple[int, int], mode: Mode, *, align_corners: bool = False) -> None:
        super().__init__()
        (h, w), (H, W) = src, size
        if mode not in ("pool", "bilinear"):
            raise ValueError(f"unknown resize mode {mode!r}")
        if mode == "pool" and (h < H or w < W):
            raise ValueError(f"cannot average-pool a {h}x{w} map up to {H}x{W}")
        self.src, self.size, self.mode, self.align_corners = (h, w), (H, W), mode, align_corners
        self.kernel: tuple[int, int] | None = None  # avg_pool2d's kernel = stride, when pooling by whole factors
        self.matrices = False
        if (h, w) == (H, W):
            return
        if mode == "pool" and h % H == 0 and w % W == 0:
            self.kernel = (h // H, w // W)
            return
        wh, ww = resize_weights(self.src, self.size, mode, align_corners=align_corners)
        self.register_buffer("wh", wh.float(), persistent=False)
        self.register_buffer("ww", ww.float(), persistent=False)
        self.matrices = True

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel is not None:
            return F.avg_pool2d(x, self.kernel, self.kernel)
        if self.matrices:
            return separable(x, self.wh, self.ww)
        return x

    def extra_repr(self) -> str:
        how = f"avg_pool2d {self.kernel}" if self.kernel else ("matmul" if self.matrices else "identity")
        return f"{self.src} -> {self.size}, {self.mode}, {how}"
