"""Names, shapes, chunking and attrs of the store (documented in the README's store table)."""

from __future__ import annotations

import numpy as np

FORMAT_VERSION = 1
ATTRS_KEY = "camkd"
CHUNK_TARGET_BYTES = 4 << 20  # chunks of at most ~4 MB along the sample axis
BLOCK_TARGET_BYTES = 32 << 20  # one writer unit (a shard) holds about this much across arrays
MAX_BLOCK_ROWS = 8192
MIN_BLOCK_ROWS = 64

DTYPES = {"float16": np.float16, "float32": np.float32}
HEAD_DIMS = {0: (), 1: ("out",), 2: ("out", "in"), 4: ("out", "in", "kh", "kw")}


def teacher_key(k: int) -> str:
    return f"t{k}"


def feature_path(layer: str, k: int) -> str:
    return f"features/{layer}/{teacher_key(k)}"


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


def block_slice(b: int, n: int, block_rows: int) -> slice:
    return slice(b * block_rows, min((b + 1) * block_rows, n))
