"""Every array of a store as a specification: what schema.py creates and what plan.py counts, from one list.

Each [V, N, ...] array stores one object per (view, row block): a shard of several chunks when a block
exceeds the chunk target, else one chunk of exactly a block; zstd (if asked) runs before the crc32c, so the
checksum covers the stored bytes. The per-sample arrays (labels, an image folder's file listing) and the
teachers' heads are written whole at creation, one crc32c per chunk; the progress flags are zarr's default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype

import camkd.store.layout as layout
import camkd.store.topk as topk

CRC = 4  # bytes of the crc32c codec per stored chunk
INDEX_ENTRY = 16  # a shard's index: (offset, nbytes) uint64 per chunk
VLEN_COUNT = 4  # zarr's vlen-utf8 codec: a uint32 count per chunk and a uint32 length per string
SAMPLE_CHUNK = 1 << 18  # rows per chunk of the per-sample arrays


@dataclass(frozen=True)
class ArraySpec:
    """One array: how it is created (``data``: written at creation) and how it is stored."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    dims: tuple[str, ...] | None
    shards: tuple[int, ...] | None = None
    compressors: tuple | None = None  # None: zarr's default (the progress flags)
    data: np.ndarray | None = None
    view: bool = False  # a [V, N, ...] array, written (view, block) unit by unit

    def create(self, g: zarr.Group) -> zarr.Array:
        """Create the array in ``g``, with its data if it has any."""
        return g.create_array(self.name, **self._options(data=True))

    def _options(self, *, data: bool) -> dict:
        """zarr's create_array options (``data`` False: an array with the same metadata and no data)."""
        kw = {"chunks": self.chunks, "shards": self.shards, "dimension_names": self.dims}
        if self.compressors is not None:
            kw["compressors"] = list(self.compressors)
        if self.data is not None:  # zarr's default fill value for the data's type
            if data:
                return kw | {"data": self.data, "config": {"write_empty_chunks": True}}
            return kw | {"shape": self.shape, "dtype": self.dtype}
        config = {"write_empty_chunks": True} if self.view else None  # progress: a flag 0 is no chunk
        return kw | {"shape": self.shape, "dtype": self.dtype, "fill_value": 0, "config": config}

    def metadata_bytes(self) -> int:
        """The size of the array's zarr.json, made in memory (no data written)."""
        return len(self._in_memory().metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())

    def chunk_bytes(self) -> int:
        """The stored size of one chunk holding a nonzero value (the progress flag of a finished block)."""
        arr = self._in_memory()
        arr[(0,) * len(self.shape)] = 1
        return arr.nbytes_stored() - self.metadata_bytes()

    def _in_memory(self) -> zarr.Array:
        return zarr.create_array(zarr.storage.MemoryStore(), **self._options(data=False))

    @property
    def row_bytes(self) -> int:
        """Bytes of one sample's entry (a view array's row)."""
        return int(np.prod(self.shape[2:], dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def data_bytes(self) -> int:
        """Bytes of the chunks of an array written at creation (padded to whole chunks, as zarr stores them)."""
        chunks = [math.ceil(s / c) for s, c in zip(self.shape, self.chunks)]
        count = int(np.prod(chunks, dtype=np.int64))
        if self.dtype.kind != "T":
            return count * (int(np.prod(self.chunks, dtype=np.int64)) * self.dtype.itemsize + CRC)
        rows = self.chunks[0]  # strings: one-dimensional, a length and the UTF-8 bytes each; padding ''
        lengths = np.array([len(s.encode()) for s in self.data.tolist()], dtype=np.int64)
        return count * (VLEN_COUNT + CRC + rows * VLEN_COUNT) + int(lengths.sum())

    def block_bytes(self, rows: int, block_rows: int) -> int:
        """Bytes of the object(s) of one (view, block) unit of a view array holding ``rows`` samples."""
        chunk = self.chunks[1]
        size = math.ceil(rows / chunk) * (chunk * self.row_bytes + CRC)
        return size + ((block_rows // chunk) * INDEX_ENTRY + CRC if self.shards else 0)


def view_array(name: str, views: int, n: int, per_sample: tuple[int, ...], dtype, dims: tuple[str, ...], block: int,
               compressor: str) -> ArraySpec:
    """A [V, N, ...] array: chunks of at most CHUNK_TARGET_BYTES within a block, sharded by block if smaller."""
    row_bytes = int(np.prod(per_sample, dtype=np.int64)) * np.dtype(dtype).itemsize
    rows = layout.plan_chunk_rows(row_bytes, block)
    codecs = ((ZstdCodec(level=layout.ZSTD_LEVEL),) if compressor == "zstd" else ()) + (Crc32cCodec(),)
    return ArraySpec(name, (views, n) + per_sample, np.dtype(dtype), (1, rows) + per_sample, dims,
                     shards=(1, block) + per_sample if rows < block else None, compressors=codecs, view=True)


def data_array(name: str, data: np.ndarray, chunks: tuple[int, ...], dims: tuple[str, ...] | None) -> ArraySpec:
    """An array written whole at creation, with a crc32c per chunk."""
    return ArraySpec(name, data.shape, data.dtype, chunks, dims, compressors=(Crc32cCodec(),), data=data)


def array_specs(*, n: int, views: int, k: int, num_classes: int, dtype: str, feature_dtype: str, compressor: str,
                logits: topk.LogitsSpec, aug: layout.AugLayout, shapes: dict[str, list], block: int,
                samples: dict[str, np.ndarray], heads: list[dict[str, np.ndarray]]) -> list[ArraySpec]:
    """Every array of a store, in the order they are created. ``samples``: the per-sample arrays by path (the labels
    first); ``shapes``: layer -> per-teacher (c, h, w); ``heads``: per teacher, its head's arrays by key."""
    value, feature = layout.DTYPES[dtype], layout.FEATURE_DTYPES[feature_dtype]
    chunk = (min(n, SAMPLE_CHUNK),)
    out = [data_array(name, np.asarray(data), chunk, ("sample",)) for name, data in samples.items()]

    def view(name: str, per_sample: tuple[int, ...], dt, dims: tuple[str, ...]) -> None:
        out.append(view_array(name, views, n, per_sample, dt, dims, block, compressor))

    view(layout.AUG, (len(aug.params),), aug.dtype, layout.VIEW_DIMS + ("param",))
    if aug.pixels:
        view(layout.PIXELS, (), np.uint32, layout.VIEW_DIMS)
    if logits.kind == "dense":
        view(layout.LOGITS, (k, num_classes), value, layout.VIEW_DIMS + ("teacher", "class"))
    else:
        types = topk.dtypes(logits, num_classes, value)
        for name, shape in topk.shapes(logits, k).items():
            view(layout.topk_path(name), shape, types[name], layout.VIEW_DIMS + layout.TOPK_DIMS[name])
    for layer, per in shapes.items():
        for t, s in enumerate(per):
            view(layout.feature_path(layer, t), tuple(s), feature, layout.FEATURE_DIMS)
            if feature_dtype == "int8":
                view(layout.scale_path(layer, t), (s[0],), np.float32, layout.SCALE_DIMS)
    for t, head in enumerate(heads):
        out += [data_array(layout.head_path(t, key), data, data.shape, layout.HEAD_DIMS.get(data.ndim))
                for key, data in head.items()]
    out.append(ArraySpec(layout.PROGRESS, (views, layout.num_blocks(n, block)), np.dtype(np.uint8), (1, 1),
                         ("view", "block")))
    return out
