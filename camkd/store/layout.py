"""Names, shapes, chunking and attrs of the store (documented in the README's store table)."""

from __future__ import annotations

import numpy as np
import zarr
from zarr.core.sync import sync  # zarr's own bridge to its async Store API

from camkd.data.order import block_slice  # noqa: F401 - the store's blocks are the order's blocks

FORMAT_VERSION = 1
ATTRS_KEY = "camkd"
CHUNK_TARGET_BYTES = 4 << 20  # chunks of at most ~4 MB along the sample axis
BLOCK_TARGET_BYTES = 32 << 20  # one writer unit (a shard) holds about this much across arrays
MAX_BLOCK_ROWS = 8192
MIN_BLOCK_ROWS = 64

DTYPES = {"float16": np.float16, "float32": np.float32}
FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32, "int8": np.int8}  # int8: with a per-(sample, channel) scale
COMPRESSORS = ("none", "zstd")
ZSTD_LEVEL = 3
SCALE_SUFFIX = "_scale"
FEATURE_SCALE = "per sample and channel, max-abs / 127"
HEAD_DIMS = {0: (), 1: ("out",), 2: ("out", "in"), 4: ("out", "in", "kh", "kw")}


def teacher_key(k: int) -> str:
    return f"t{k}"


def feature_path(layer: str, k: int) -> str:
    return f"features/{layer}/{teacher_key(k)}"


def scale_path(layer: str, k: int) -> str:
    """The float32 [V, N, c] scale array beside an int8 feature array (feature = q * scale)."""
    return feature_path(layer, k) + SCALE_SUFFIX


def feature_dtype(attrs: dict) -> str:
    """The stored dtype of a store's feature arrays (stores without the attr: the logits' dtype)."""
    return attrs.get("feature_dtype") or attrs["dtype"]


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[rows, c, h, w] floats -> (int8 q, float32 scale [rows, c]): scale = max|x| over (h, w) / 127 (0 -> 1),
    q = round(x / scale) clipped to [-127, 127]."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=(2, 3)) / np.float32(127)
    scale[scale == 0] = 1
    q = np.clip(np.rint(x / scale[:, :, None, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 q [..., c, h, w] and scale [..., c] -> float32 q * scale."""
    return q.astype(np.float32) * scale[..., None, None]


def head_path(k: int, key: str) -> str:
    return f"heads/{teacher_key(k)}/{key}"


def plan_block_rows(bytes_per_row: int, batch_size: int, n: int) -> int:
    """Rows per writer unit: a power of two in [64, 8192] near BLOCK_TARGET_BYTES, at least one batch,
    and no larger than needed to hold all ``n`` rows (a partial chunk is stored whole)."""
    rows = MIN_BLOCK_ROWS
    while rows * 2 <= MAX_BLOCK_ROWS and rows * 2 * bytes_per_row <= BLOCK_TARGET_BYTES:
        rows *= 2
    while rows < batch_size and rows < MAX_BLOCK_ROWS:
        rows *= 2
    while rows > MIN_BLOCK_ROWS and rows // 2 >= n:
        rows //= 2
    return rows


def plan_chunk_rows(bytes_per_row: int, block_rows: int) -> int:
    """Rows per chunk: the largest power-of-two divisor of block_rows with chunks <= CHUNK_TARGET_BYTES."""
    rows = block_rows
    while rows > 1 and rows * bytes_per_row > CHUNK_TARGET_BYTES:
        rows //= 2
    return rows


def num_blocks(n: int, block_rows: int) -> int:
    return (n + block_rows - 1) // block_rows


# -- stored objects (chunks, or shards where an array is sharded) -----------------------------------
# Each view x sample array stores one object per (view, row block): a shard when its chunks are
# smaller than a block, else one chunk of exactly a block.

def object_rows(arr: zarr.Array) -> int:
    """Rows along the sample axis held by one stored object (a shard, or a chunk if unsharded)."""
    return (arr.shards or arr.chunks)[1]


def block_object_keys(arr: zarr.Array, view: int, rows: slice) -> list[str]:
    """Store keys of the objects that hold ``rows`` of ``view``, from the array's own chunk key encoding."""
    step = object_rows(arr)
    tail = (0,) * (arr.ndim - 2)
    return [object_key(arr, (view, c) + tail) for c in range(rows.start // step, (rows.stop - 1) // step + 1)]


def object_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """The store key of the object at ``coords`` of the array's shard grid (its chunk grid if unsharded)."""
    key = arr.metadata.encode_chunk_key(coords)
    return f"{arr.store_path.path}/{key}" if arr.store_path.path else key


def object_size(arr: zarr.Array, key: str) -> int | None:
    """Bytes of a stored object, None if it does not exist (zarr would read it as fill values)."""
    try:
        return int(sync(arr.store.getsize(key)))
    except FileNotFoundError:
        return None


def delete_object(arr: zarr.Array, key: str) -> None:
    sync(arr.store.delete(key))


def read_failure(e: BaseException) -> str:
    """What is known about a chunk that zarr could not read, in words (no exception class names, no bytes)."""
    if isinstance(e, OSError):
        return f"cannot be read from disk ({e.strerror or 'I/O error'})"
    if "checksum" in str(e).lower():
        return "fails its checksum"
    return "cannot be decoded"
