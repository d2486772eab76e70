"""The one CPU path from an image file to uint8 views, for the writer (teachers) and the reader (student).

Pillow decodes (libjpeg-turbo for JPEG), converts to RGB as torchvision's ``ImageFolder`` loader
does (``convert("RGB")``: grayscale replicated, CMYK converted, alpha dropped; EXIF orientation
not applied), crops the box and resizes it bilinearly with Pillow's antialiasing filter, then
mirrors when asked: exactly torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip`` on a
PIL image, and ``Resize`` + ``CenterCrop`` for evaluation.

Why Pillow: the point of the store is that the student sees the teachers' pixels, on another machine too.
torchvision.io's decode + torch's resize is faster, but torch's uint8 antialiased resize takes a different kernel
per CPU (other pixels without AVX2 than with it); Pillow's resampler is portable C, and its crops came out
byte-identical whatever SIMD libjpeg-turbo used. ``resize(box=...)`` and ``Image.draft()`` would change pixels
against torchvision's recipe. Every view is hashed (:func:`pixel_hashes`: CRC-32 of its bytes, stdlib ``zlib``,
4 bytes per view, a small fraction of making it). The measurements: BENCHMARKS.md, "Image folders: the decode path".
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

from camkd.data.rrc import EvalCrop, center_crop_box

DECODER = "pillow-rgb+crop+bilinear"  # names the path; the versions come from decoder_versions()

Source = str | os.PathLike | bytes
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}  # evaluation's resize filters


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


def eval_view_into(img: Image.Image, size: int, out: np.ndarray, crop_fraction: float = 0.875, *,
                   resize: int | None = None, interpolation: str = "bilinear") -> np.ndarray:
    """The one evaluation path: torchvision's ``Resize(round(size / crop_fraction))`` + ``CenterCrop(size)`` of the
    opened image into ``out`` (uint8 [3, size, size]); returns ``out``. ``resize`` (the shorter side's length, at least
    ``size``) replaces round(size / crop_fraction); ``interpolation``: 'bilinear' or 'bicubic' (Pillow's, antialiased,
    as torchvision's ``Resize(interpolation=...)`` on a PIL image): a published model's own eval transform."""
    width, height = img.size
    g = center_crop_box(height, width, size, crop_fraction) if resize is None else resize_crop_box(height, width, size, resize)
    resized = _rgb(img).resize((g.resize_w, g.resize_h), INTERPOLATIONS[interpolation])
    return _into(resized.crop((g.left, g.top, g.left + size, g.top + size)), 0, out)


def resize_crop_box(h: int, w: int, size: int, resize: int) -> EvalCrop:
    """torchvision's ``Resize(resize)`` + ``CenterCrop(size)`` geometry: the shorter side becomes ``resize``, the longer
    int(resize * long / short); the crop's offsets are ``CenterCrop``'s. ``resize`` >= ``size`` (the crop inside)."""
    if h < 1 or w < 1 or size < 1 or resize < size:
        raise ValueError(f"image {h}x{w}, crop {size} and resize {resize} must be at least 1, the resize at least the crop")
    rh, rw = (int(resize * h / w), resize) if w <= h else (resize, int(resize * w / h))
    return EvalCrop(rh, rw, int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0)), size)


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


def pixel_hashes(batch: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint32 [B]: the CRC-32 (zlib) of each view of a uint8 batch [B, 3, H, W], its bytes in C order."""
    a = _uint8_array(batch)
    return np.fromiter((zlib.crc32(row) for row in a), dtype=np.uint32, count=a.shape[0])
