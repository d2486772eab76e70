"""Staging the views of a remote store to local disk while training reads another one.

Distillation reads one view per epoch (epoch e reads view (e - 1) mod V), so the next view can be
downloaded during the current epoch. A :class:`ViewStager` copies, byte for byte and under the same
keys, the objects of one view (the object of every row block of every ``[V, N, ...]`` array whose
first index is that view) into a local folder that zarr opens as a LocalStore, on one background
thread (a ThreadPoolExecutor; the copies themselves run concurrently on zarr's event loop). The
metadata of every node and the small arrays (labels, heads) are copied once; progress flags are not
(they are read from the remote store). A staged view is read with the store's own codecs, so its
checksums are verified on read as they are on the remote store. At most ``keep`` views are kept
(the current one and the next); the folder (a new temporary folder, under ``folder`` if given) is
deleted when the stager is closed or garbage-collected, or at exit.

Under torchrun the ranks of one machine share one copy: local rank 0 stages into a folder every rank
of the job on that machine can name (:func:`node_stage_name`), the others read it once it is staged
(sources.py agrees on that at the start of each view), so each view is downloaded and written to
local disk once per machine, not once per rank.

fsspec's ``simplecache::`` does nothing under zarr's FsspecStore, hence this.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.common import concurrent_map
from zarr.core.sync import sync
from zarr.storage import LocalStore

import camkd.store.layout as layout
from camkd.errors import CamkdError
from camkd.store.location import _reason
from camkd.store.reader import TeacherStore
from camkd.store.sizes import is_view_array, walk_arrays

COPY_CONCURRENCY = 8  # objects in flight at once (each whole in memory while copied: a shard is at most ~32 MB)


def _close(pool: ThreadPoolExecutor, folder: Path) -> None:
    pool.shutdown(wait=True, cancel_futures=True)
    shutil.rmtree(folder, ignore_errors=True)


def open_staged(folder: Path, src: TeacherStore) -> TeacherStore:
    """The staged copy in ``folder`` of the remote store ``src``, read as a local store (its metadata must be there)."""
    return TeacherStore(zarr.open_group(str(folder), mode="r"), src.path, src.location)


def node_stage_name(store: TeacherStore) -> str:
    """One folder name for every rank of this job on this machine, and a different one on each machine.

    Derived from what the launcher gives every rank alike (MASTER_ADDR/PORT, the restart attempt) and
    the store, plus the host name (a stage folder on a file system shared by nodes is one per node), so
    no collective is needed to agree on it.
    """
    job = "|".join([os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
                    os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), str(store.path)])
    return f"camkd-stage-{hashlib.sha256(job.encode()).hexdigest()[:16]}-{socket.gethostname()}"


class ViewStager:
    """Copies views of a remote store into a local folder; :meth:`store` returns a TeacherStore over the copy."""

    def __init__(self, store: TeacherStore, folder: str | os.PathLike | None = None,
                 layers: tuple[str, ...] | None = None, *, name: str | None = None) -> None:
        """``layers``: the feature layers to stage (None: all); aug and logits (dense or top-k) are always staged.

        ``name``: stage into ``folder/name`` (made anew: a folder of that name left by a killed job is
        removed) rather than a new random folder, so that other processes can find the copy.
        """
        self.src = store
        self.remote = store.g.store
        root = store.g.store_path.path  # keys are relative to the store; the group sits at its root
        if root:
            raise CamkdError(f"{store.path}: staging needs the camkd group at the root of the store")
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        if name is None:
            self.folder = Path(tempfile.mkdtemp(prefix="camkd-stage-", dir=folder))
        else:
            self.folder = Path(folder if folder is not None else tempfile.gettempdir()) / name
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
        self.local = LocalStore(str(self.folder))
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="camkd-stage")
        self._finalizer = weakref.finalize(self, _close, self.pool, self.folder)
        self._lock = threading.Lock()
        self.jobs: dict[int, Future] = {}
        arrays = list(walk_arrays(store.g))
        wanted = None if layers is None else layout.staged_prefixes(layers)
        self.view_arrays = [arr for name, arr in arrays if is_view_array(arr)
                            and (wanted is None or name in wanted or name.startswith(wanted))]
        meta = ["zarr.json"] + [f"{name}/zarr.json" for name, _ in store.g.members(max_depth=None)]
        small = [layout.object_key(arr, c) for name, arr in arrays if not is_view_array(arr) and name != layout.PROGRESS
                 for c in arr._iter_shard_coords()]
        self._base = self.pool.submit(self._copy, meta, "metadata")
        self._small = self.pool.submit(self._copy, small, "labels and heads", required=False)  # fill-value chunks are not stored
        self._staged: TeacherStore | None = None
        self.bytes_copied = 0

    # -- what to copy ---------------------------------------------------------------------------
    def view_keys(self, view: int) -> list[str]:
        """Store keys of every object of ``view`` (one per row block of each [V, N, ...] array)."""
        return [key for arr in self.view_arrays for key in layout.block_object_keys(arr, view, slice(0, self.src.n))]

    def _copy(self, keys: list[str], what: str, *, required: bool = True) -> None:
        proto = default_buffer_prototype()
        missing: list[str] = []

        async def one(key: str) -> int:
            buf = await self.remote.get(key, prototype=proto)
            if buf is None:
                if required:
                    missing.append(key)
                return 0
            await self.local.set(key, buf)
            return len(buf)

        try:
            sizes = sync(concurrent_map([(k,) for k in keys], one, COPY_CONCURRENCY))
        except CamkdError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore / fsspec / OS errors of several kinds
            raise CamkdError(f"cannot stage {what} of {self.src.path} to {self.folder}: {_reason(e)}") from None
        with self._lock:
            self.bytes_copied += sum(sizes)
        if missing:
            raise CamkdError(f"{self.src.path}: object {missing[0]} of {what} is missing ({len(missing)} in all); "
                             f"run 'camkd cache-verify {self.src.path} --repair', then rerun the same cache-teachers command")

    # -- use --------------------------------------------------------------------------------------
    def start(self, view: int) -> None:
        """Begin copying ``view`` in the background (no-op if it is staged or being staged)."""
        with self._lock:
            if view not in self.jobs:
                self.jobs[view] = self.pool.submit(self._copy, self.view_keys(view), f"view {view}")

    def store(self, view: int) -> TeacherStore:
        """A TeacherStore over the local copy, once ``view`` is staged (waits for it; re-raises a copy error)."""
        self.start(view)
        self._base.result()
        self._small.result()
        try:
            self.jobs[view].result()
        except BaseException:
            with self._lock:
                self.jobs.pop(view, None)  # a later call tries again
            raise
        if self._staged is None:
            self._staged = open_staged(self.folder, self.src)
        return self._staged

    def evict(self, keep: set[int]) -> None:
        """Delete the local objects of every staged view not in ``keep`` (waiting for a copy in progress)."""
        for view in [v for v in self.jobs if v not in keep]:
            fut = self.jobs.pop(view)
            fut.cancel()
            try:
                fut.result()
            except BaseException:  # noqa: BLE001 - its error does not matter any more
                pass
            for key in self.view_keys(view):
                try:
                    (self.folder / key).unlink()
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        """Stop copying and delete the folder."""
        self._finalizer()
