"""What a store takes on storage: every array's stored bytes, per sample-view, in words (read side)."""

from __future__ import annotations

from collections.abc import Iterator

import zarr

import camkd.store.layout as layout
from camkd.store.location import listed_sizes
from camkd.words import human  # noqa: F401 - the store's size words (plan, space, info, cache import it here)


def walk_arrays(g: zarr.Group) -> Iterator[tuple[str, zarr.Array]]:
    """(path, array) of every array in the group, at any depth."""
    for name, node in g.members(max_depth=None):
        if isinstance(node, zarr.Array):
            yield name, node


def is_view_array(arr: zarr.Array) -> bool:
    """A [V, N, ...] array: one row block of it per writer unit (its first dimensions are view, sample)."""
    dims = arr.metadata.dimension_names
    return arr.ndim >= 2 and bool(dims) and tuple(dims[:2]) == layout.VIEW_DIMS


def array_sizes(g: zarr.Group) -> dict[str, int]:
    """Bytes stored of every array by path, sorted (zarr's nbytes_stored: every object under the array, shards whole,
    metadata). On object storage from one listing of the store (a request per 1000 objects) instead of a HEAD per object."""
    arrays = sorted(walk_arrays(g), key=lambda item: item[0])
    listed = listed_sizes(g)
    if listed is None:
        return {name: arr.nbytes_stored() for name, arr in arrays}
    base = g.store_path.path
    out = {}
    for name, _ in arrays:
        prefix = f"{base}/{name}/" if base else f"{name}/"
        out[name] = sum(size for key, size in listed.items() if key.startswith(prefix))
    return out


def bytes_per_sample_view(g: zarr.Group, sizes: dict[str, int], n: int, views: int) -> dict[str, float]:
    """Stored bytes of each [V, N, ...] array divided by N x V (what one more view or sample costs), by path, sorted."""
    return {name: sizes[name] / max(n * views, 1) for name, arr in sorted(walk_arrays(g), key=lambda item: item[0])
            if is_view_array(arr)}


def per_sample_view_text(per: dict[str, float]) -> str:
    """'TOTAL (name SIZE, ...)': what cache-teachers and cache-info print of bytes_per_sample_view."""
    return f"{human(sum(per.values()))} (" + ", ".join(f"{name} {human(v)}" for name, v in per.items()) + ")"

