"""The one CPU path from an image file to uint8 views, for the writer (teachers) and the reader (student).

Pillow decodes (libjpeg-turbo for JPEG), converts to RGB as torchvision's ``ImageFolder`` loader
does (``convert("RGB")``: grayscale replicated, CMYK converted, alpha dropped; EXIF orientation
not applied), crops the box and resizes it bilinearly with Pillow's antialiasing filter, then
mirrors when asked: exactly torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip`` on a
PIL image, and ``Resize`` + ``CenterCrop`` for evaluation.

Why Pillow, measured (2 shared CPUs, "Intel(R) Xeon(R) Processor", 2026-12-05, torch 2.14.1,
torchvision 0.29.1, Pillow 13.0.0 with libjpeg-turbo 3.2.0; ``OMP_NUM_THREADS=1 .venv/bin/python
/tmp/rrc_bench/bench.py``, a script not kept in the repository: 200 generated 500x375 JPEGs at
quality 90 decoded, cropped to ``rrc_boxes`` boxes, resized to 224 and flipped, one thread,
best of 3 passes, two runs; the machine was shared with other jobs, load average 1.4-2.1, so
runs differ by up to 20 %):

    Pillow decode only                                         1.14-1.16 ms/image
    torchvision.io.decode_image only                           0.90-1.06 ms/image
    Pillow decode + crop + resize(BILINEAR) + flip             1.73-2.08 ms/image   (480-580 images/s)
    Pillow decode + resize(box=...) in one pass                1.75-2.21 ms/image
    torchvision.io + v2.functional.resized_crop(antialias)     1.48-1.50 ms/image   (670 images/s)

The two decoders gave the same bytes on all 50 files compared; the two resizers differ by at most
1 level (mean 0.013).

torchvision.io + torch's resize is 15-40 % faster, but torch's uint8 antialiased resize takes a
different kernel per CPU: with ``ATEN_CPU_CAPABILITY=default`` (the kernel of CPUs without AVX2)
the same 50 crops came out with other pixels than with ``avx2`` or ``avx512``. Pillow's resampler
is portable C, and Pillow's crops were byte-identical with libjpeg-turbo's SIMD turned off
(``JSIMD_FORCENONE=1``, decode 2x slower) or forced to SSE2. The point of the store
is that the student sees the teacher's pixels on another machine, so Pillow it is.

Measured and not used (same script's files, 2026-12-05, load average 3-4, so rough):

- ``resize(size, box=...)`` (crop and resize in one call): other pixels than crop-then-resize on 599 of 600 views
  (its filter reads pixels outside the box at the edges, which torchvision's crop does not) and no faster
  (1.23-1.39 ms against 1.17-1.41 ms per view at 224).
- ``Image.draft()`` (libjpeg's DCT-domain downscale by 1/2, 1/4 or 1/8 before the resize, as DALI and FFCV do):
  with a margin that keeps the scaled box at least twice the output side (Pillow's own ``reducing_gap=2`` rule),
  a 500x375 image's box (at most 500 px wide) is never large enough at 224 px, so it would change pixels only
  at small outputs (it would apply to about half the boxes at 64 px) and make the views another recipe than
  torchvision's there. Not worth a second recipe: at 64 px the student's step, not the decode, is the cost.
- Decoding only the rows down to the box's bottom: Pillow refuses a JPEG tile shorter than the image
  ("broken data stream"); it is not exposed.

Every view is hashed with :func:`pixel_hash` (CRC-32 of its bytes, stdlib ``zlib``, 4 bytes per view):
36 us for a 3x224x224 view against about 2 ms to make it (same script: blake2b with an 8-byte
digest 180-200 us, adler32 53-56 us).
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Sequence

import numpy as np
import PIL
import torch
from PIL import Image, features

from camkd.data.rrc import RATIO, SCALE, center_crop_box, rrc_boxes

DECODER = "pillow-rgb+crop+bilinear"  # names the path; the versions come from decoder_versions()

Source = str | os.PathLike | bytes


def open_image(source: Source) -> Image.Image:
    """Open a JPEG / PNG file (path or its bytes) lazily: the header is read, the pixels not yet."""
    return Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source)


def _rgb(img: Image.Image) -> Image.Image:
    """Decoded RGB pixels, as torchvision's ImageFolder loader converts them."""
    return img if img.mode == "RGB" else img.convert("RGB")


def _into(img: Image.Image, flip: int, out: np.ndarray) -> np.ndarray:
    """RGB PIL image -> ``out`` (uint8 [3, H, W], C order), mirrored left-right if ``flip``; returns ``out``."""
    a = np.asarray(img)
    out[...] = (a[:, ::-1] if flip else a).transpose(2, 0, 1)
    return out


def _new(size: int) -> np.ndarray:
    return np.empty((3, size, size), dtype=np.uint8)


def _crop_resize(img: Image.Image, box: Sequence[int], size: int) -> Image.Image:
    """torchvision's ``resized_crop`` on a PIL image: crop the box, then resize it (bilinear, antialiased)."""
    top, left, h, w = (int(v) for v in box)
    width, height = img.size
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > height or left + w > width:
        raise ValueError(f"crop box (top {top}, left {left}, height {h}, width {w}) is not inside the {height}x{width} image")
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)


def train_view_into(img: Image.Image, box: Sequence[int], flip: int, size: int, out: np.ndarray) -> np.ndarray:
    """The one training-view path: ``box`` (top, left, height, width) of the opened image, decoded to RGB, cropped,
    resized to ``size`` x ``size``, mirrored if ``flip``, written into ``out`` (uint8 [3, size, size]); returns ``out``."""
    return _into(_crop_resize(_rgb(img), box, size), flip, out)


def eval_view_into(img: Image.Image, size: int, out: np.ndarray, crop_fraction: float = 0.875) -> np.ndarray:
    """The one evaluation path: torchvision's ``Resize(round(size / crop_fraction))`` + ``CenterCrop(size)`` of the
    opened image into ``out`` (uint8 [3, size, size]); returns ``out``."""
    width, height = img.size
    g = center_crop_box(height, width, size, crop_fraction)
    resized = _rgb(img).resize((g.resize_w, g.resize_h), Image.Resampling.BILINEAR)
    return _into(resized.crop((g.left, g.top, g.left + size, g.top + size)), 0, out)


def load_view(source: Source, box: Sequence[int], flip: int, size: int) -> torch.Tensor:
    """The training view: uint8 [3, size, size] of ``box`` (top, left, height, width) of the image, resized, flipped if ``flip``."""
    with open_image(source) as img:
        return torch.from_numpy(train_view_into(img, box, flip, size, _new(size)))


def load_train_view(source: Source, *, seed: int, view: int, index: int, size: int,
                    scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO) -> tuple[torch.Tensor, np.ndarray, int]:
    """Sample ``index``'s view ``view``: its box and flip come from :func:`rrc_boxes` on the image's size (read from its header).

    Returns (uint8 [3, size, size], box int32 [4] as (top, left, height, width), flip). The loader's workers do the
    same a batch at a time (``folder.py``: one :func:`rrc_boxes` call for the batch's header sizes, then
    :func:`train_view_into` per image into the batch's array).
    """
    with open_image(source) as img:
        width, height = img.size
        boxes, flips = rrc_boxes(seed, view, np.array([index]), height, width, scale=scale, ratio=ratio)
        return torch.from_numpy(train_view_into(img, boxes[0], int(flips[0]), size, _new(size))), boxes[0], int(flips[0])


def load_eval(source: Source, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    """The evaluation view: uint8 [3, size, size], torchvision's ``Resize(round(size / crop_fraction))`` + ``CenterCrop(size)``."""
    with open_image(source) as img:
        return torch.from_numpy(eval_view_into(img, size, _new(size), crop_fraction))


def decoder_versions() -> dict[str, str | None]:
    """What touches the pixels, for the store to record: this path's name, Pillow (conversion and
    resampling) and its JPEG library. PNG is lossless (zlib inflate), so its library is not listed."""
    return {
        "decoder": DECODER,
        "pillow": PIL.__version__,
        "libjpeg": features.version("jpg"),
        "libjpeg_turbo": features.version("libjpeg_turbo"),
    }


def _uint8_array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if x.dtype != np.uint8:
        raise ValueError(f"pixel hashes are of uint8 views, got {x.dtype}")
    return np.ascontiguousarray(x)


def pixel_hash(view: torch.Tensor | np.ndarray) -> int:
    """CRC-32 (zlib) of a uint8 view's bytes in C order, [3, H, W] as :func:`load_view` returns it."""
    return zlib.crc32(_uint8_array(view))


def pixel_hashes(batch: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint32 [B]: :func:`pixel_hash` of each view of a uint8 batch [B, 3, H, W]."""
    a = _uint8_array(batch)
    return np.fromiter((zlib.crc32(row) for row in a), dtype=np.uint32, count=a.shape[0])
