"""What a finished cache-teachers run reports: per-view teacher accuracy from the stored logits, sizes, layers."""

from __future__ import annotations

from dataclasses import replace

import zarr

import camkd.store.layout as layout
import camkd.store.topk as topk
from camkd.store.description import write_description
from camkd.store.location import Location
from camkd.store.reader import TeacherStore
from camkd.store.sizes import array_sizes, bytes_per_sample_view


def _store(g: zarr.Group, path: Location) -> TeacherStore:
    return TeacherStore(g, path.local_path if path.is_local else path.url, path)


def record_tail_mass(g: zarr.Group, path: Location) -> TeacherStore:
    """A finished top-k store: each teacher's tail mass (mean, 99th percentile, max over every sample-view) per
    cached temperature, into the attrs (``topk_tail_mass``), so a user sees what k costs. Returns the store as it is
    now."""
    store = _store(g, path)
    if store.logits_spec.kind != "topk" or not store.progress().all():
        return store
    tail = topk.tail_summary(store.read_array(layout.topk_path("log_tail")), store.logits_spec.temperatures)
    write_description(g, replace(store.description, topk_tail_mass=tail))
    return _store(g, path)


def summarize(store: TeacherStore, path: Location, rows_done: int, elapsed: float) -> dict:
    """Per-view teacher accuracy from the stored logits, sizes per array, the layers the store holds."""
    g = store.g
    labels = store.labels()
    acc = []
    for v in range(store.views):
        top1 = store.top1(v)
        acc.append([float((top1[:, t] == labels).mean() * 100) for t in range(top1.shape[1])])
    sizes = array_sizes(g)
    return {"path": str(path), "views": store.views, "n": store.n, "rows_computed": rows_done, "seconds": elapsed,
            "samples_per_s": rows_done / max(elapsed, 1e-9), "view_accuracy": acc,
            "teachers": [t.arch for t in store.description.teachers], "store_bytes": sum(sizes.values()),
            "layers": sorted(store.layers), "bytes_per_sample_view": bytes_per_sample_view(g, sizes, store.n, store.views)}
