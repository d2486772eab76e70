"""Filling a store block by block: the teachers run over block i while block i - 1 is written.

The unit of work is a (view, row block): the teachers run over the block's batches, a
background thread writes the block (one shard per array, so no two writes share a shard)
and only then sets the block's progress flag. Teacher outputs go straight into two per-block
buffers allocated once (one filled while the other is written), so a run allocates no
per-batch host arrays. A killed run resumes at the first block without a flag; completed
blocks are never recomputed, and because every block is computed from the same batches, the
finished store is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import errno
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import zarr

import camkd.store.layout as layout
import camkd.store.topk as topk
from camkd.data import DataSplit
from camkd.data.augspec import AugSpec
from camkd.data.norm import normalize
from camkd.errors import CamkdError
from camkd.progress import Bar
from camkd.store.description import StoreDescription
from camkd.store.location import Location
from camkd.store.runner import TeacherRunner


class _Block:
    """Host buffers of one row block (aug, logit arrays, per-layer per-teacher features), filled in place batch by batch."""

    def __init__(self, rows: int, d: StoreDescription, k: int, c: int, shapes: dict) -> None:
        np_dtype = layout.DTYPES[d.dtype]
        self.dtype = d.dtype
        self.spec = d.logits
        aug = d.aug_layout
        self.aug = np.empty((rows, len(aug.params)), dtype=aug.dtype)
        self.pixels = np.empty(rows, dtype=np.uint32) if aug.pixels else None
        if self.spec.kind == "dense":
            self.logits = {layout.LOGITS: np.empty((rows, k, c), dtype=np_dtype)}
        else:
            dt = topk.dtypes(self.spec, c, np_dtype)
            self.logits = {layout.topk_path(name): np.empty((rows,) + shape, dtype=dt[name])
                           for name, shape in topk.shapes(self.spec, k).items()}
        fd = np.float32 if d.int8_features else layout.FEATURE_DTYPES[d.feature_dtype]  # int8: quantized by the writer
        self.feats = {name: [np.empty((rows,) + tuple(s), dtype=fd) for s in shapes[name]] for name in d.features}
        self.pending: Future | None = None  # the write of the block these buffers hold

    def put(self, s: int, params: torch.Tensor, hashes: np.ndarray | None, logits: torch.Tensor,
            feats: dict[str, list[torch.Tensor]], labels: torch.Tensor) -> None:
        """Copy one batch's outputs into rows s: (dtype conversion and device-to-host copy in one pass, no temporaries).
        ``hashes``: the views' CRC-32s (image folders); ``labels``: the batch's labels (a top-k store's cross-entropies
        need them)."""
        e = s + len(logits)
        torch.from_numpy(self.aug[s:e]).copy_(params)
        if self.pixels is not None:
            self.pixels[s:e] = hashes
        if self.spec.kind == "dense":
            torch.from_numpy(self.logits[layout.LOGITS][s:e]).copy_(logits)
        else:
            for name, value in topk.compute(logits, labels, self.spec, self.dtype).items():
                torch.from_numpy(self.logits[layout.topk_path(name)][s:e]).copy_(value)  # cast and copy to the host in one pass
        for name, per_teacher in feats.items():
            for buf, f in zip(self.feats[name], per_teacher):
                torch.from_numpy(buf[s:e]).copy_(f)


class _Writer:
    """Writes finished blocks on one background thread (concurrent.futures); errors re-raise in the caller.

    A block's progress flag is set in the same task after all its arrays are written. After a
    failed write no later block is written, so a flag never follows a failure.
    """

    def __init__(self, g: zarr.Group, d: StoreDescription, k: int) -> None:
        self.layer_names, self.k, self.int8 = list(d.features), k, d.int8_features
        self.logit_names = d.logit_arrays()
        self.pixels = d.keeps_pixels
        self.arrays = {name: g[name] for name in d.view_arrays()}  # opened once: on object storage each g[name] is a metadata GET
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="camkd-writer")
        self.failed = threading.Event()

    def submit(self, v: int, b: int, rows: slice, blk: _Block) -> None:
        blk.pending = self.pool.submit(self._write, v, b, rows, blk)

    def _write(self, v: int, b: int, rows: slice, blk: _Block) -> None:
        if self.failed.is_set():
            return
        m = rows.stop - rows.start
        try:
            a = self.arrays
            a[layout.AUG][v, rows] = blk.aug[:m]
            if self.pixels:
                a[layout.PIXELS][v, rows] = blk.pixels[:m]
            for name in self.logit_names:
                a[name][v, rows] = blk.logits[name][:m]
            for name in self.layer_names:
                for t in range(self.k):
                    if self.int8:  # quantized here, on the writer thread, vectorised over the block
                        q, scale = layout.quantize(blk.feats[name][t][:m])
                        a[layout.feature_path(name, t)][v, rows] = q
                        a[layout.scale_path(name, t)][v, rows] = scale
                    else:
                        a[layout.feature_path(name, t)][v, rows] = blk.feats[name][t][:m]
            a[layout.PROGRESS][v, b] = 1  # only after every array of the block is written
        except BaseException:
            self.failed.set()
            raise

    def close(self) -> None:
        """Finish the writes already handed over (finished blocks stay), then stop the thread."""
        self.pool.shutdown(wait=True)


def _wait(blk: _Block) -> None:
    """Block until the buffers' previous write is done (re-raising its error), so they can be refilled."""
    if blk.pending is not None:
        fut, blk.pending = blk.pending, None
        fut.result()


def compute_blocks(g: zarr.Group, d: StoreDescription, path: Location, teachers: TeacherRunner, train: DataSplit,
                   spec: AugSpec, shapes: dict, batch: int, todo: list[tuple[int, int]], rows_todo: int, *, progress: bool) -> None:
    """Run the teachers over the unfinished (view, block) units ``todo`` (``rows_todo`` rows) of the store ``d``
    describes and write each one whole."""
    n, k, block, views = len(train), teachers.num_teachers, d.block_rows, d.views
    layers = d.layer_indices()
    buffers = [_Block(min(block, n), d, k, train.num_classes, shapes) for _ in range(2)]
    writer = _Writer(g, d, k)
    try:
        with Bar("caching", rows_todo, enabled=progress) as bar:
            for i, (v, b) in enumerate(todo):
                blk = buffers[i % 2]
                _wait(blk)
                rows = layout.block_slice(b, n, block)
                batches = [np.arange(s, min(s + batch, rows.stop)) for s in range(rows.start, rows.stop, batch)]
                for idx, (images, params, hashes) in zip(batches, train.view_batches(spec, v, batches, teachers.device)):
                    logits, feats = teachers.run(normalize(images, spec.norm), layers)
                    blk.put(int(idx[0]) - rows.start, params, hashes, logits, feats,
                            train.labels[torch.from_numpy(idx).to(train.labels.device)])
                    bar.update(len(idx), f"view {v + 1}/{views}")
                writer.submit(v, b, rows, blk)
            for blk in buffers:
                _wait(blk)
    except OSError as e:
        raise _io_error(e, path) from None
    finally:
        writer.close()


def _io_error(e: OSError, path: Location) -> CamkdError:
    if e.errno == errno.ENOSPC:
        return CamkdError(f"disk full while writing {path}; finished blocks are kept, free space and rerun the same command to resume")
    return CamkdError(f"cannot write {path}: {e.strerror or e}; finished blocks are kept, rerun the same command to resume")
