"""The size of a store before anything is written: per array, in all, per sample-view; and what is still to write.

The plan counts every array of arrays.py's list (the one schema.py creates): the view x sample arrays
with their chunks padded to whole chunks, a 4-byte crc32c per chunk and a sharded array's index, the
per-sample arrays (labels, an image folder's file listing), the teachers' heads, the progress flags,
and each array's metadata document (made in memory), so an uncompressed store's plan is the size
cache-info reports once it is written. A zstd store's size is known only once written: its plan
counts its view x sample arrays uncompressed, which zstd makes smaller (an estimate; it says about).
`cache-teachers` prints this plan, refuses to start when the target cannot hold what is still to
write, and `--dry-run` stops after printing it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import camkd.store.layout as layout
import camkd.store.topk as topk
from camkd.store.arrays import array_specs
from camkd.store.sizes import human
from camkd.words import plural

GROUPED = (layout.HEADS_GROUP, layout.FILES_GROUP)  # printed as one line each (every teacher's head, the listing)


@dataclass
class StorePlan:
    n: int
    views: int
    block_rows: int
    arrays: dict[str, int] = field(default_factory=dict)  # bytes on storage per array, metadata included
    view_arrays: set[str] = field(default_factory=set)  # the [V, N, ...] arrays among them
    unit_bytes: list[int] = field(default_factory=list)  # per block: one (view, block) unit's objects and its flag
    compressed: bool = False  # zstd: the view x sample figures are uncompressed (an estimate)

    @property
    def total(self) -> int:
        return sum(self.arrays.values())

    def to_write(self, done: np.ndarray | None) -> int:
        """Bytes still to write: the whole store (``done`` None: it is created), else its (view, block) units not
        flagged in ``done`` [stored views, blocks], the views beyond it included."""
        if done is None:
            return self.total
        flags = np.zeros((self.views, len(self.unit_bytes)), dtype=bool)
        flags[: done.shape[0]] = done[: self.views]
        return int((~flags).sum(axis=0) @ np.asarray(self.unit_bytes, dtype=np.int64))

    def lines(self) -> list[str]:
        what = ("about: the view x sample arrays uncompressed (zstd makes them smaller, by as much as the data allow)"
                if self.compressed else "the size it will have: every array, its metadata included")
        out = [f"planned store: {plural(self.views, 'view')} x {plural(self.n, 'sample')}, blocks of {self.block_rows} "
               f"rows ({what})"]
        shown = self._shown()
        width = max(len(name) for name in shown)
        for name, size in shown.items():
            per = f"  ({size / (self.n * self.views):,.0f} B per sample-view)" if name in self.view_arrays else ""
            out.append(f"  {name:<{width}}  {human(size):>10}{per}")
        out.append(f"  {'total':<{width}}  {human(self.total):>10}  ({self.total / (self.n * self.views):,.0f} B per "
                   "sample-view)")
        return out

    def _shown(self) -> dict[str, int]:
        """The arrays as printed: heads/* and files/* summed into one line each."""
        out: dict[str, int] = {}
        for name, size in self.arrays.items():
            group = name.split("/")[0]
            key = f"{group}/*" if group in GROUPED else name
            out[key] = out.get(key, 0) + size
        return out


def block_rows_for(k: int, num_classes: int, itemsize: int, shapes: dict[str, list], batch: int, n: int, *,
                   feature_itemsize: int | None = None, scales: bool = False, logits: topk.LogitsSpec = topk.DENSE,
                   aug: layout.AugLayout = layout.CROP_AUG) -> int:
    """Rows per writer unit (one shard of every array) for this store (``scales``: int8 features' scale arrays)."""
    f_item = itemsize if feature_itemsize is None else feature_itemsize
    aug_row = len(aug.params) * np.dtype(aug.dtype).itemsize + (4 if aug.pixels else 0)
    row = sum(logit_row_bytes(k, num_classes, itemsize, logits).values()) + aug_row + sum(
        int(np.prod(s)) * f_item + (s[0] * 4 if scales else 0) for per in shapes.values() for s in per)
    return layout.plan_block_rows(row, batch, n)


def logit_row_bytes(k: int, num_classes: int, itemsize: int, logits: topk.LogitsSpec) -> dict[str, int]:
    """Bytes per sample of each array that holds the logits (``logits``, or the ``topk/`` arrays)."""
    if logits.kind == "dense":
        return {layout.LOGITS: k * num_classes * itemsize}
    value = {2: np.float16, 4: np.float32}[itemsize]
    return {layout.topk_path(name): b for name, b in topk.row_bytes(logits, k, num_classes, value).items()}


def plan_store(*, n: int, views: int, k: int, num_classes: int, dtype: str, shapes: dict[str, list],
               block_rows: int, feature_dtype: str | None = None, compressor: str = "none",
               logits: topk.LogitsSpec = topk.DENSE, aug: layout.AugLayout = layout.CROP_AUG,
               samples: dict[str, np.ndarray] | None = None, heads: list[dict[str, np.ndarray]] = ()) -> StorePlan:
    """The plan of a store of ``views`` views over ``n`` samples (shapes: layer -> per-teacher (c, h, w)).
    ``feature_dtype``: None for ``dtype``; ``samples``: the per-sample arrays by path, the labels first (None: int64
    labels alone); ``heads``: per teacher, its head's arrays by key."""
    samples = samples if samples is not None else {layout.LABELS: np.zeros(n, dtype=np.int64)}
    specs = array_specs(n=n, views=views, k=k, num_classes=num_classes, dtype=dtype, feature_dtype=feature_dtype or dtype,
                        compressor=compressor, logits=logits, aug=aug, shapes=shapes, block=block_rows, samples=samples,
                        heads=list(heads))
    plan = StorePlan(n=n, views=views, block_rows=block_rows, compressed=compressor != "none")
    blocks = [layout.block_slice(b, n, block_rows) for b in range(layout.num_blocks(n, block_rows))]
    unit = np.zeros(len(blocks), dtype=np.int64)
    for spec in specs:
        if spec.view:
            per_block = np.array([spec.block_bytes(s.stop - s.start, block_rows) for s in blocks], dtype=np.int64)
            unit += per_block
            plan.arrays[spec.name] = views * int(per_block.sum()) + spec.metadata_bytes()
            plan.view_arrays.add(spec.name)
        elif spec.name == layout.PROGRESS:
            flag = spec.chunk_bytes()  # one chunk per flag, zarr's default codec
            unit += flag
            plan.arrays[spec.name] = views * len(blocks) * flag + spec.metadata_bytes()
        else:
            plan.arrays[spec.name] = spec.data_bytes() + spec.metadata_bytes()
    plan.unit_bytes = unit.tolist()
    return plan


def free_bytes(path: Path) -> int:
    """Free space of the filesystem that holds (or will hold) ``path``."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free
