"""Reading a teacher store for distillation: whole views in memory, features streamed in blocks.

Never per-sample zarr reads: logits of a view come in one read; features either whole
(within a memory budget) or as contiguous row blocks in a seeded shuffled order,
shuffled within a window of blocks in memory, the next windows prefetched by a thread.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.core.buffer.cpu import NDBuffer

import camkd.store.layout as layout
import camkd.store.topk as topk
from camkd.data import DataSplit, load_dataset
from camkd.data.augspec import AugSpec
from camkd.data.base import SIZE_OPTIONS
from camkd.data.listing import Listing, check_none_added, check_unchanged
from camkd.data.views import to_device
from camkd.errors import CamkdError
from camkd.store.description import LayerSpec, read_description
from camkd.store.location import Location, parse_location
from camkd.words import plural


@dataclass
class Expect:
    """What the caller needs of a store; open_store checks each and says how to fix a mismatch."""

    dataset_fingerprint: str | None = None
    dataset_name: str | None = None
    augmentation: dict | None = None
    num_classes: int | None = None
    layers: tuple[str, ...] = ()


class TeacherStore:
    """A validated camkd store opened read-only.

    ``path`` is what messages name: the local Path, or the URL of a remote store (also when ``group`` is a
    local staged copy of some of its views, see stage.py); ``location`` is the parsed store location.
    """

    def __init__(self, group: zarr.Group, path: Path | str, location: Location | None = None) -> None:
        self.g, self.path = group, path
        self.location = location if location is not None else parse_location(path)
        self.description = read_description(group)
        d = self.description
        self.n: int = d.dataset.n
        self.views: int = d.views
        self.num_teachers: int = d.num_teachers
        self.num_classes: int = d.dataset.num_classes
        self.block_rows: int = d.block_rows
        self.layers: dict[str, LayerSpec] = d.features
        self.feature_dtype: str = d.feature_dtype  # int8: dequantized to float32 when read
        self.logits_spec: topk.LogitsSpec = d.logits

    @property
    def attrs(self) -> dict:
        """The attrs as stored (what plain zarr shows); camkd itself reads :attr:`description`."""
        return self.description.to_attrs()

    # -- small arrays, read whole ------------------------------------------------------------
    def read_array(self, name: str, sel=slice(None), what: str = "") -> np.ndarray:
        """``sel`` of array ``name`` (``what``: which part, for the message); a chunk that cannot be read is one
        CamkdError naming the array and the repair."""
        try:
            return np.asarray(self.g[name][sel])
        except Exception as e:  # zarr raises codec / IO errors of several types
            raise CamkdError(f"{self.path}: array '{name}' {what}cannot be read (a chunk {layout.read_failure(e)}); "
                             f"run 'camkd cache-verify {self.path} --repair', then rerun the same cache-teachers command") from None

    def labels(self) -> np.ndarray:
        return self.read_array(layout.LABELS)

    def aug(self, view: int) -> np.ndarray:
        return self.read_array(layout.AUG, view, f"view {view} ")

    def pixels(self, view: int) -> np.ndarray | None:
        """[N] uint32 CRC-32 of each view the teachers saw (image-folder stores), None where the store keeps none."""
        return self.read_array(layout.PIXELS, view, f"view {view} ") if self.description.keeps_pixels else None

    def listing(self, root: str | Path) -> Listing:
        """The file listing an image-folder store was made from, rooted at ``root`` (its arrays under ``files/``)."""
        ds = self.description.dataset
        path, size, label = (self.read_array(layout.files_path(name)) for name in layout.FILES)
        return Listing(ds.name, os.fspath(root), ds.split, [str(p) for p in path], size, label, self.description.folder.classes)

    def progress(self) -> np.ndarray:
        return self.read_array(layout.PROGRESS)

    def top1(self, view: int) -> np.ndarray:
        """[N, K] each teacher's top-1 class in ``view`` as stored: the first maximal index of the stored logits
        (numpy's argmax), the class a top-k store keeps first (topk.kept_classes), so both give the same classes."""
        if self.logits_spec.kind == "topk":
            return self.read_array(layout.topk_path("index"), (view, slice(None), slice(None), 0), f"view {view} ").astype(np.int64)
        return self.read_array(layout.LOGITS, view, f"view {view} ").argmax(-1)

    def missing_blocks(self) -> list[tuple[int, int]]:
        p = self.progress()
        return [(int(v), int(b)) for v, b in zip(*np.nonzero(p == 0))]

    def logits(self, view: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """One view's logits [N, K, C] in the stored dtype, in one read (a dense store; see :meth:`topk`)."""
        if self.logits_spec.kind != "dense":
            raise CamkdError(f"{self.path} keeps top-{self.logits_spec.k} logits, not dense ones; read them with topk()")
        return to_device(torch.from_numpy(self.read_array(layout.LOGITS, view, f"view {view} ")), torch.device(device))

    def topk(self, view: int, T: float, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """One view's top-k arrays (store/topk.py) on ``device``, ``lse`` and ``log_tail`` at temperature T
        ([N, K]); each array in one read."""
        j = topk.temperature_index(self.logits_spec, T, str(self.path))
        out = {}
        for name in layout.TOPK:
            a = self.read_array(layout.topk_path(name), view, f"view {view} ")
            if name in ("lse", "log_tail"):
                a = np.ascontiguousarray(a[..., j])
            elif name == "index":
                a = a.astype(np.int64)
            out[name] = to_device(torch.from_numpy(a), torch.device(device))
        return out

    def head_state(self, t: int, keys: list[str]) -> dict[str, torch.Tensor]:
        """Teacher ``t``'s stored classifier head weights (``keys``: its head's state_dict keys); the caller
        builds the head module (camkd.teachers.stored_heads), the store knows no models."""
        return {key: torch.from_numpy(self.read_array(layout.head_path(t, key))) for key in keys}

    def feature_shapes(self, layer: str) -> list[tuple[int, ...]]:
        return list(self.layers[layer].shapes)

    def feature_bytes_per_view(self, layers: tuple[str, ...]) -> int:
        """Bytes of one view's features in memory as read (int8 stores: dequantized float32)."""
        item = 4 if self.feature_dtype == "int8" else np.dtype(layout.FEATURE_DTYPES[self.feature_dtype]).itemsize
        return sum(self.n * int(np.prod(s)) * item for layer in layers for s in self.feature_shapes(layer))

    def features(self, layer: str, view: int, rows: slice = slice(None)) -> list[np.ndarray]:
        """Per-teacher features of ``rows`` (a contiguous range) in ``view``; an int8 store's come dequantized
        (float32 q * scale, one vectorised pass over the block read)."""
        what = f"view {view} rows {rows.start or 0}:{rows.stop if rows.stop is not None else self.n} "
        out = [self.read_array(layout.feature_path(layer, t), (view, rows), what) for t in range(self.num_teachers)]
        if self.feature_dtype == "int8":
            out = [layout.dequantize(q, self.read_array(layout.scale_path(layer, t), (view, rows), what)) for t, q in enumerate(out)]
        return out


def open_store(path: str | Path, expect: Expect | None = None) -> TeacherStore:
    """Open and validate a store; each mismatch is a one-line CamkdError that says how to fix it."""
    loc = parse_location(path)
    path = loc.local_path if loc.is_local else loc.url  # never a Path of a URL
    if not loc.exists():
        raise CamkdError(f"store {path} not found; create it with 'camkd cache-teachers --out {path} ...'")
    g = layout.open_camkd_group(loc, "r", str(path), not_camkd="create one with 'camkd cache-teachers'",
                                unreadable=f"{path} is not a camkd store (no readable Zarr group); create it with "
                                           "'camkd cache-teachers'")
    store = TeacherStore(g, path, loc)
    if expect is not None:
        check_expect(store, expect)
    return store


def check_expect(store: TeacherStore, e: Expect) -> None:
    """Validate an open store against what the caller needs (see open_store)."""
    d, ds = store.description, store.description.dataset
    fix = "re-cache with 'camkd cache-teachers' for this data, or pass the same --dataset/--limit as when caching"
    if e.dataset_name is not None and ds.name != e.dataset_name:
        raise CamkdError(f"{store.path} caches dataset '{ds.name}', not '{e.dataset_name}'; {fix}")
    if e.dataset_fingerprint is not None and ds.fingerprint != e.dataset_fingerprint:
        raise CamkdError(f"{store.path} was cached from other data (fingerprint {ds.fingerprint[:12]}, now "
                         f"{e.dataset_fingerprint[:12]}; N {ds.n}); the dataset or --limit changed; {fix}")
    if e.num_classes is not None and store.num_classes != e.num_classes:
        raise CamkdError(f"{store.path} has {store.num_classes} classes, the student needs {e.num_classes}; {fix}")
    if e.augmentation is not None and d.augmentation != e.augmentation:
        raise CamkdError(f"{store.path} was cached with augmentation {d.augmentation}, asked "
                         f"{e.augmentation}; re-cache with the seed you need (cache-teachers --aug-seed)")
    for layer in e.layers:
        if layer not in store.layers:
            raise CamkdError(f"{store.path} holds no '{layer}' features; re-cache with 'camkd cache-teachers ... --features "
                             f"{layout.layer_option(layer)}'")
    missing = store.missing_blocks()
    if missing:
        v, b = missing[0]
        raise CamkdError(f"{store.path} is incomplete ({plural(len(missing), 'block')} missing, first: view {v} block {b}); "
                         "rerun the same cache-teachers command to finish it")


def load_cached_data(store: TeacherStore, *, data_dir: str | None = None,
                     workers: int | None = None) -> tuple[DataSplit, DataSplit, AugSpec]:
    """The training split a store was made from, its test split, and its augmentation: the one place that checks a
    store against the data here (the fingerprint, and that this camkd replays the store's augmentation).
    ``workers``: decoding processes of an image-folder dataset (None: its default; refused by in-memory ones)."""
    d, ds = store.description, store.description.dataset
    reopen = d.split_options  # how the store's data opens again (recorded; a store from before: derived)
    if data_dir is None and reopen.needs_data_dir:  # said here, in the store's words: no --dataset was given
        raise CamkdError(f"{store.path} was cached from {ds.name} image files: give --data-dir, the folder that holds "
                         "its train/ and val/")
    runtime: dict = {} if workers is None else {"workers": workers}
    candidates = [reopen.options]
    if d.reopen is None and reopen.kind == "generated":  # a store from before: a set of exactly n samples (options
        candidates = [dict(reopen.options, num_samples=ds.n), reopen.options]  # num_samples), or the first n (--limit)
    files = data_dir is not None and layout.files_path("path") in store.g  # an image folder: name the first changed file
    for opts in candidates:
        try:
            train = load_dataset(reopen.dataset, ds.split, data_dir=data_dir, limit=ds.n, **opts, **runtime)
        except CamkdError:  # e.g. fewer files than the store's samples
            if files:
                check_unchanged(store.listing(data_dir), data_dir)
            raise
        if train.fingerprint == ds.fingerprint:
            break
    if train.fingerprint != ds.fingerprint and files:
        check_unchanged(store.listing(data_dir), data_dir)
    if files and train.fingerprint == ds.fingerprint and d.folder.whole and not train.listing.whole:
        check_none_added(store.listing(data_dir), data_dir)  # the folder has more files than the whole one had
    if train.fingerprint != ds.fingerprint:
        raise CamkdError(f"{store.path} was cached from other data than {ds.name} here (fingerprint {ds.fingerprint[:12]}, "
                         f"N {ds.n}); the dataset changed since caching: give the same --data-dir or re-cache")
    test_options = {k: v for k, v in reopen.options.items() if k not in SIZE_OPTIONS}  # the whole test split
    test = load_dataset(reopen.dataset, "test", data_dir=data_dir, **test_options, **runtime)
    spec = d.aug_spec()
    if spec.to_dict() != train.aug_spec(spec.seed).to_dict():
        raise CamkdError(f"{store.path} was cached with augmentation {d.augmentation}, which this camkd does not replay; re-cache")
    return train, test, spec


# -- epoch plans and streaming ---------------------------------------------------------------------

def _window_blocks(rows: np.ndarray, block_rows: int) -> list[int]:
    return sorted(set((rows // block_rows).tolist()))


def dequantize_torch(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`camkd.store.layout.dequantize` in torch, on any device: float32 q * scale, the same single float32
    product per element, so the same values bit for bit."""
    out = q.to(torch.float32)
    return out.mul_(scale[..., None, None])  # in place: one float32 tensor made, not two


class BufferPool:
    """The host buffers FeatureStreams decode windows into, kept by their owner across streams (epochs): a buffer is
    taken for a window and given back once nothing holds its rows (on a GPU: once they are copied there). When every
    buffer is held, a new one is made, so a consumer that keeps windows gets correct rows, only more memory."""

    def __init__(self) -> None:
        self._free: dict[tuple, list] = {}
        self._lock = threading.RLock()  # re-entrant: a lease freed by the GC inside give() on this thread

    def take(self, key: tuple, make):
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        return make()

    def give(self, key: tuple, buf) -> None:
        with self._lock:
            self._free.setdefault(key, []).append(buf)


class _Lease:
    """A buffer of a pool, given back when the last rows that read it are gone."""

    def __init__(self, pool: BufferPool, key: tuple, buf) -> None:
        self.pool, self.key, self.buf = pool, key, buf

    def __del__(self) -> None:
        self.pool.give(self.key, self.buf)


class Rows:
    """Rows of streamed windows, not gathered yet: the step gathers them, as it gathers a whole view's rows. Each
    piece is one window's blocks as stored (a tensor, or int8 + float32 scales) on the device and the rows' positions
    in them (a tensor there too); slicing cuts the positions, :meth:`gather` makes the rows (int8: dequantized by
    :func:`dequantize_torch`), the same values as the whole view's bit for bit."""

    def __init__(self, pieces: list[tuple[tuple[torch.Tensor, ...], torch.Tensor, object]]) -> None:
        self.pieces = pieces

    def __len__(self) -> int:
        return sum(len(pos) for _, pos, _ in self.pieces)

    def __getitem__(self, sl: slice) -> Rows:
        start, stop, step = sl.indices(len(self))
        if step != 1:
            raise ValueError("Rows are sliced by contiguous ranges only")
        out, at = [], 0
        for arrays, pos, lease in self.pieces:
            lo, hi = max(start - at, 0), min(stop - at, len(pos))
            if lo < hi:
                out.append((arrays, pos[lo:hi], lease))
            at += len(pos)
        return Rows(out)

    @staticmethod
    def cat(parts: list[Rows]) -> Rows:
        return Rows([p for r in parts for p in r.pieces])

    def gather(self) -> torch.Tensor:
        got = []
        for arrays, pos, _ in self.pieces:
            g = [a.index_select(0, pos) for a in arrays]
            got.append(dequantize_torch(*g) if len(g) == 2 else g[0])
        return got[0] if len(got) == 1 else torch.cat(got)


class FeatureStream:
    """Yields (indices, {layer: [per-teacher rows]}) windows, loading the next ``prefetch`` windows on a thread.

    Each window's blocks are decoded once, by zarr, straight into a host buffer per (layer, teacher) taken from
    ``buffers`` (a :class:`BufferPool` its owner keeps across epochs; pinned when ``device`` is a CUDA device).
    ``device`` None: the window's rows are gathered on the host into numpy arrays (int8 dequantized by
    :func:`layout.dequantize`). A torch device: :class:`Rows`, gathered by the step (CUDA: the blocks copied
    ``non_blocking`` from the pinned buffer on a side stream, int8 sent as int8 + scales, gathered and dequantized
    on the device; the CPU: the buffer itself, indexed once by the step). Values are the store's bit for bit either
    way. At most 1 + ``prefetch`` windows are read ahead; a read error re-raises in the consumer; leaving the loop
    early cancels what is queued and waits for the one read in progress.
    """

    def __init__(self, store: TeacherStore, layers: tuple[str, ...], view: int, windows: list[np.ndarray],
                 *, prefetch: int = 2, device: torch.device | str | None = None, buffers: BufferPool | None = None) -> None:
        self.store, self.layers, self.view, self.windows = store, layers, view, windows
        self.prefetch = max(prefetch, 1)
        self.device = torch.device(device) if device is not None else None
        self._cuda = self.device is not None and self.device.type == "cuda"
        self._int8 = store.feature_dtype == "int8"
        self.buffers = buffers if buffers is not None else BufferPool()
        self._arrs = {layer: [self._arrays(layer, t) for t in range(store.num_teachers)] for layer in layers}
        br, n = store.block_rows, store.n
        self._cap = max((sum(len(range(*layout.block_slice(b, n, br).indices(n))) for b in _window_blocks(w, br))
                         for w in windows if len(w)), default=0)
        self._pin = self._cuda and torch.cuda.is_available()  # pinning needs a driver
        self._key = (str(store.path), layers, self._cap, self._pin)
        self._copy_stream = None

    def _arrays(self, layer: str, t: int) -> list[tuple[str, zarr.Array]]:
        names = [layout.feature_path(layer, t)] + ([layout.scale_path(layer, t)] if self._int8 else [])
        out = []
        for name in names:
            try:
                out.append((name, self.store.g[name]))
            except Exception:  # the store's read of it says what is wrong and the repair, in one line
                self.store.read_array(name, (self.view, slice(0, 1)), f"view {self.view} ")
                raise
        return out

    def _make_buffer(self) -> dict[str, list[tuple[torch.Tensor, ...]]]:
        """One host buffer per (layer, teacher) array, as many rows as the largest window's blocks hold."""
        return {layer: [tuple(torch.empty((self._cap, *a.shape[2:]), dtype=_torch_dtype(a.dtype), pin_memory=self._pin)
                              for _, a in per) for per in arrs] for layer, arrs in self._arrs.items()}

    def _read_into(self, name: str, arr: zarr.Array, sl: slice, out: np.ndarray) -> None:
        """Decode rows ``sl`` of ``arr`` into ``out`` (zarr's one copy); a failure is the store's one error line."""
        try:
            arr.get_basic_selection((self.view, sl), out=NDBuffer.from_numpy_array(out))
        except Exception:  # the store's read names the array and the repair; a transient failure is read once more
            out[...] = self.store.read_array(name, (self.view, sl), f"view {self.view} rows {sl.start}:{sl.stop} ")

    def _load(self, rows: np.ndarray):
        """Read the window's blocks into a buffer; their rows in the window's (shuffled) order: gathered (numpy), or
        their positions (:class:`Rows`)."""
        br, n = self.store.block_rows, self.store.n
        blocks = _window_blocks(rows, br)
        slices = [layout.block_slice(b, n, br) for b in blocks]
        sizes = [len(range(*sl.indices(n))) for sl in slices]
        # position of each requested row in the concatenation of the window's blocks
        offsets = np.zeros(max(blocks) + 1, dtype=np.int64)
        offsets[blocks] = np.cumsum([0] + sizes[:-1])
        where = offsets[rows // br] + rows % br
        m = sum(sizes)
        lease = _Lease(self.buffers, self._key, self.buffers.take(self._key, self._make_buffer))
        bufs = lease.buf
        for layer in self.layers:
            for arrs, held in zip(self._arrs[layer], bufs[layer]):
                for (name, arr), buf in zip(arrs, held):
                    at = 0
                    for sl, size in zip(slices, sizes):
                        self._read_into(name, arr, sl, buf[at : at + size].numpy())
                        at += size
        if self._cuda:
            return self._to_cuda(bufs, m, where)
        if self.device is None:  # the host API: gathered here, the buffer free again when the lease goes
            got = {layer: [tuple(np.take(b[:m].numpy(), where, axis=0) for b in held) for held in bufs[layer]]
                   for layer in self.layers}
            return {layer: [layout.dequantize(*g) if self._int8 else g[0] for g in per] for layer, per in got.items()}
        pos = torch.from_numpy(where)
        return {layer: [Rows([(tuple(b[:m] for b in held), pos, lease)]) for held in bufs[layer]] for layer in self.layers}

    def _to_cuda(self, bufs, m: int, where: np.ndarray):
        """The window's blocks (as stored: int8 + scales) copied non_blocking from the pinned buffer on a side stream;
        returns once the copy is done (the buffer is then free again), the rows still to gather on the device."""
        with torch.cuda.device(self.device):
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream()
            with torch.cuda.stream(self._copy_stream):
                pos = torch.from_numpy(where).pin_memory().to(self.device, non_blocking=True)
                dev = {layer: [tuple(b[:m].to(self.device, non_blocking=True) for b in held) for held in bufs[layer]]
                       for layer in self.layers}
                done = torch.cuda.Event()
                done.record()
            done.synchronize()  # the pinned buffer may be refilled now (given back with its lease)
        return _OnDevice(pos, dev, done)

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict[str, list]]]:
        pending: deque[tuple[np.ndarray, Future]] = deque()
        windows = iter(self.windows)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="camkd-prefetch") as pool:
            try:
                while True:
                    while len(pending) <= self.prefetch:
                        rows = next(windows, None)
                        if rows is None:
                            break
                        pending.append((rows, pool.submit(self._load, rows)))
                    if not pending:
                        return
                    rows, fut = pending.popleft()
                    got = fut.result()
                    yield rows, (got.rows() if isinstance(got, _OnDevice) else got)
            finally:
                for _, fut in pending:
                    fut.cancel()


class _OnDevice:
    """A window's blocks on a CUDA device, copied on the stream's side stream; :meth:`rows` hands them to the
    current stream (which the step gathers them on)."""

    def __init__(self, pos: torch.Tensor, dev: dict[str, list[tuple[torch.Tensor, ...]]], done) -> None:
        self.pos, self.dev, self.done = pos, dev, done

    def rows(self) -> dict[str, list[Rows]]:
        stream = torch.cuda.current_stream(self.pos.device)
        stream.wait_event(self.done)
        self.pos.record_stream(stream)  # allocated on the copy stream, used on this one
        for per in self.dev.values():
            for held in per:
                for a in held:
                    a.record_stream(stream)
        return {layer: [Rows([(held, self.pos, None)]) for held in per] for layer, per in self.dev.items()}


def _torch_dtype(dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
