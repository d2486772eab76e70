"""The size of a store before anything is written: per array, in all, per sample-view; and the room for it.

The formula follows the layout exactly (layout.py): every chunk of a view x sample array is
stored whole (a partial last chunk at full size) with a 4-byte crc32c, and a sharded array adds
a 16-byte index entry per chunk and a 4-byte checksum per shard. `cache-teachers` prints this
plan, refuses to start when the target cannot hold it, and `--dry-run` stops after printing it.
int8 features take 1 byte per element plus a float32 scale array (4 bytes per sample and channel),
exactly. A zstd store's size cannot be predicted: its plan is the uncompressed size, an upper bound
(it says so), and the refusal uses that bound unless --no-space-check is given.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from camkd.store import layout, topk
from camkd.store.sizes import human
from camkd.words import plural

CRC = 4  # bytes of the crc32c codec per stored chunk
INDEX_ENTRY = 16  # a shard's index: (offset, nbytes) uint64 per chunk
SMALL_ARRAY = 1024  # progress flags and a head's arrays: counted as about this each
METADATA = 700  # an array's zarr.json (about 640 bytes for ours): an estimate, the one inexact term


@dataclass
class StorePlan:
    n: int
    views: int
    block_rows: int
    arrays: dict[str, int] = field(default_factory=dict)  # bytes on storage per array
    compressed: bool = False  # zstd: every view x sample figure is an upper bound (uncompressed)

    @property
    def total(self) -> int:
        return sum(self.arrays.values())

    def lines(self) -> list[str]:
        bound = ", upper bound (uncompressed; zstd makes it smaller)" if self.compressed else ""
        out = [f"planned store: {plural(self.views, 'view')} x {plural(self.n, 'sample')}, blocks of {self.block_rows} rows{bound}"]
        width = max(len(name) for name in self.arrays)
        for name, size in self.arrays.items():
            per = "" if name == layout.LABELS else f"  ({size / (self.n * self.views):,.0f} B per sample-view)"
            out.append(f"  {name:<{width}}  {human(size):>10}{per}")
        out.append(f"  {'total':<{width}}  {human(self.total):>10}  ({self.total / (self.n * self.views):,.0f} B per "
                   "sample-view)")
        return out


def logit_row_bytes(k: int, num_classes: int, itemsize: int, logits: topk.LogitsSpec) -> dict[str, int]:
    """Bytes per sample of each array that holds the logits (``logits``, or the ``topk/`` arrays)."""
    if logits.kind == "dense":
        return {layout.LOGITS: k * num_classes * itemsize}
    value = {2: np.float16, 4: np.float32}[itemsize]
    return {layout.topk_path(name): b for name, b in topk.row_bytes(logits, k, num_classes, value).items()}


def block_rows_for(k: int, num_classes: int, itemsize: int, shapes: dict[str, list], batch: int, n: int, *,
                   feature_itemsize: int | None = None, scales: bool = False, logits: topk.LogitsSpec = topk.DENSE) -> int:
    """Rows per writer unit (one shard of every array) for this store (``scales``: int8 features' scale arrays)."""
    f_item = itemsize if feature_itemsize is None else feature_itemsize
    row = sum(logit_row_bytes(k, num_classes, itemsize, logits).values()) + 6 + sum(int(np.prod(s)) * f_item + (s[0] * 4 if scales else 0)
                                               for per in shapes.values() for s in per)
    return layout.plan_block_rows(row, batch, n)


def view_array_bytes(views: int, n: int, row_bytes: int, block_rows: int) -> int:
    """Bytes of one [V, N, ...] array as writer.py lays it out."""
    rows = layout.plan_chunk_rows(row_bytes, block_rows)
    chunks = math.ceil(n / rows)
    size = views * chunks * (rows * row_bytes + CRC)
    if rows < block_rows:  # sharded: one index per shard
        shards = math.ceil(n / block_rows)
        size += views * shards * ((block_rows // rows) * INDEX_ENTRY + CRC)
    return size + METADATA


def plan_store(*, n: int, views: int, k: int, num_classes: int, dtype: str, shapes: dict[str, list],
               block_rows: int, feature_dtype: str | None = None, compressor: str = "none",
               logits: topk.LogitsSpec = topk.DENSE) -> StorePlan:
    """The plan of a store of ``views`` views over ``n`` samples (shapes: layer -> per-teacher (c, h, w)).
    ``feature_dtype``: None for ``dtype``; ``compressor`` "zstd": the plan is the uncompressed upper bound."""
    item = np.dtype(layout.DTYPES[dtype]).itemsize
    fdtype = feature_dtype or dtype
    f_item = np.dtype(layout.FEATURE_DTYPES[fdtype]).itemsize
    plan = StorePlan(n=n, views=views, block_rows=block_rows, compressed=compressor != "none")
    plan.arrays[layout.LABELS] = math.ceil(n / (1 << 18)) * ((1 << 18 if n > 1 << 18 else n) * 8 + CRC) + METADATA
    plan.arrays[layout.AUG] = view_array_bytes(views, n, 6, block_rows)
    for name, row in logit_row_bytes(k, num_classes, item, logits).items():
        plan.arrays[name] = view_array_bytes(views, n, row, block_rows)
    for layer, per in shapes.items():
        for t, s in enumerate(per):
            plan.arrays[layout.feature_path(layer, t)] = view_array_bytes(views, n, int(np.prod(s)) * f_item, block_rows)
            if fdtype == "int8":
                plan.arrays[layout.scale_path(layer, t)] = view_array_bytes(views, n, int(s[0]) * 4, block_rows)
    plan.arrays[layout.PROGRESS] = SMALL_ARRAY + views * math.ceil(n / block_rows)
    return plan


def free_bytes(path: Path) -> int:
    """Free space of the filesystem that holds (or will hold) ``path``."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free
