"""RandomResizedCrop + horizontal flip as a pure function of (aug seed, view, sample index, image size).

The algorithm is torchvision's ``RandomResizedCrop.get_params`` (torchvision 0.29,
``transforms/transforms.py``): up to 10 tries of

    area fraction a ~ U(scale), log aspect ratio ~ U(log ratio), r = exp(.)
    w = round(sqrt(A a r)), h = round(sqrt(A a / r))       (A = H W; round half to even, as Python's)
    accept if 0 < w <= W and 0 < h <= H; then top ~ randint(0, H - h), left ~ randint(0, W - w)

and, if no try fits, its fallback: the central crop of the whole image clamped to the ratio range.
The flip is ``RandomHorizontalFlip(0.5)``. Only the source of randomness differs: every draw comes
from :func:`camkd.data.counter.hash_counter` (splitmix64 of (seed, view, index, field)), so a sample's
box depends on nothing but (seed, view, index, its image's height and width), whatever the batch,
its order, the process or the machine. Fields (numbered in ``counter.py``'s one table):

    RRC_FLIP                            flip
    RRC_TRY0 + 4 t + 0 / 1 / 2 / 3      try t (0..9): area fraction / log ratio / top / left

From a 64-bit hash x:

    uniform in [0, 1):  (x >> 11) * 2**-53          (the top 53 bits, exact in float64)
    integer in [0, n):  ((x >> 32) * n) >> 32       (the top 32 bits scaled by n in exact uint64
                                                   arithmetic; n < 2**32, bias <= n / 2**32)

The draws are float64 where torch draws float32; the distribution is the same and the test compares
it with torchvision's over 20k draws. Boxes are int32 (top, left, height, width) in the decoded
image's pixels, always inside it with height, width >= 1 (torchvision's fallback could give 0 for a
ratio range far from 1 on a 1-pixel edge; here it is clamped to 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from camkd.data.counter import RRC_FLIP, RRC_TRIES, RRC_TRY0, hash_counter, hash_fields

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
RECIPE = "rrc-tv10-fallback+hflip0.5/hash-v1"  # changes whenever a box or flip could change
PARAMS = ("top", "left", "height", "width", "flip")  # a view's augmentation parameters, in this order (the store's aug)

_SHIFT = np.uint64(32)


def uniform01(x: np.ndarray) -> np.ndarray:
    """float64 in [0, 1) from uint64 hashes: their top 53 bits times 2**-53."""
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def below(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """int64 in [0, n) from uint64 hashes: top 32 bits times n, shifted down 32 (n >= 1, n < 2**32)."""
    return (((x >> _SHIFT) * np.asarray(n, dtype=np.uint64)) >> _SHIFT).astype(np.int64)


def _check(indices: np.ndarray, heights: np.ndarray, widths: np.ndarray, scale: tuple[float, float],
           ratio: tuple[float, float]) -> None:
    if indices.size and indices.min() < 0:
        raise ValueError("sample indices must be non-negative")
    if heights.size and (heights.min() < 1 or widths.min() < 1):
        raise ValueError("image heights and widths must be at least 1")
    if heights.size and max(heights.max(), widths.max()) >= 2**31:
        raise ValueError("image heights and widths must be below 2**31")
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must be (min, max) with 0 < min <= max, got {ratio}")


def _fallback(heights: np.ndarray, widths: np.ndarray, ratio: tuple[float, float]) -> np.ndarray:
    """torchvision's fallback: the centred crop of the whole image clamped to the ratio range, [n, 4]."""
    in_ratio = widths / heights
    narrow, wide = in_ratio < ratio[0], in_ratio > ratio[1]
    h = np.where(narrow, np.rint(widths / ratio[0]), heights)
    w = np.where(wide, np.rint(heights * ratio[1]), widths)
    h, w = np.maximum(h, 1).astype(np.int64), np.maximum(w, 1).astype(np.int64)
    return np.stack([(heights - h) // 2, (widths - w) // 2, h, w], axis=1)


def rrc_boxes(seed: int, view: int, indices: np.ndarray, heights: np.ndarray | int, widths: np.ndarray | int, *,
              scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes and flips of samples ``indices`` of ``view``, images of ``heights`` x ``widths`` pixels.

    heights, widths: one per index (or one for all). Returns (boxes int32 [n, 4] as (top, left,
    height, width), flips uint8 [n], 1 = mirror left-right after the resize). Vectorized over the
    samples and the tries: every try's draws are computed and the first that fits is taken (a try's draws
    depend only on its fields, so this is torchvision's loop; one image's box costs a few numpy calls).
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    hs, ws = (np.broadcast_to(np.asarray(v, dtype=np.int64), idx.shape) for v in (heights, widths))
    _check(idx, hs, ws, scale, ratio)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    draws = hash_fields(seed, view, idx, RRC_TRY0 + np.arange(4 * RRC_TRIES)).reshape(idx.size, RRC_TRIES, 4)
    target = (hs * ws)[:, None] * (scale[0] + uniform01(draws[..., 0]) * (scale[1] - scale[0]))  # [n, tries]
    r = np.exp(log_r[0] + uniform01(draws[..., 1]) * (log_r[1] - log_r[0]))
    w, h = np.rint(np.sqrt(target * r)), np.rint(np.sqrt(target / r))
    ok = (w > 0) & (w <= ws[:, None]) & (h > 0) & (h <= hs[:, None])
    placed = np.flatnonzero(ok.any(axis=1))  # the first try that fits wins, as in torchvision's loop
    t = ok[placed].argmax(axis=1)
    w, h = w[placed, t].astype(np.int64), h[placed, t].astype(np.int64)
    top = below(draws[placed, t, 2], hs[placed] - h + 1)
    left = below(draws[placed, t, 3], ws[placed] - w + 1)
    boxes = np.zeros((idx.size, 4), dtype=np.int64)
    boxes[placed] = np.stack([top, left, h, w], axis=1)
    unplaced = np.flatnonzero(~ok.any(axis=1))
    if unplaced.size:
        boxes[unplaced] = _fallback(hs[unplaced], ws[unplaced], ratio)
    flips = (hash_counter(seed, view, idx, RRC_FLIP) >> np.uint64(63)).astype(np.uint8)
    return boxes.astype(np.int32), flips


class EvalCrop(NamedTuple):
    """Evaluation geometry: resize the whole image to (resize_h, resize_w), then take rows
    top..top+size and columns left..left+size."""

    resize_h: int
    resize_w: int
    top: int
    left: int
    size: int


def center_crop_box(h: int, w: int, size: int, crop_fraction: float = 0.875) -> EvalCrop:
    """torchvision's reference evaluation (``Resize(round(size / crop_fraction))`` + ``CenterCrop(size)``).

    The shorter side becomes round(size / crop_fraction) (256 for 224), the longer one
    int(short * long / short_in) as torchvision's ``Resize`` computes it; the centre crop's offsets
    are ``CenterCrop``'s int(round((resized - size) / 2)). size / crop_fraction >= size, so the
    crop is always inside the resized image.
    """
    if h < 1 or w < 1 or size < 1:
        raise ValueError(f"image {h}x{w} and size {size} must be at least 1")
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    short = round(size / crop_fraction)
    if w <= h:
        rh, rw = int(short * h / w), short
    else:
        rh, rw = short, int(short * w / h)
    return EvalCrop(rh, rw, int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0)), size)
