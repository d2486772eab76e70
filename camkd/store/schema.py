"""The store's shape on storage: every array's metadata, labels, heads and attrs (create), and more views (append).

The arrays are those of arrays.py's list (the one plan.py counts), chunked as layout.py defines.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import zarr

import camkd
import camkd.store.layout as layout
from camkd.store.arrays import array_specs
from camkd.store.config import CacheConfig
from camkd.store.description import StoreDescription, write_description
from camkd.store.location import Location
from camkd.store.runner import TeacherRunner

CREATING = "camkd_creating"  # the only attr of a remote store whose creation has not finished


def create(target: Location, made: StoreDescription, cfg: CacheConfig, teachers: TeacherRunner, samples: dict[str, np.ndarray],
           shapes: dict, test_acc: list[float] | None, block: int) -> zarr.Group:
    """Write the group, every array's metadata, the per-sample arrays (``samples``: the labels, and an image folder's
    file listing) and heads, then the attrs (``made`` completed with what only creation knows). A local store is built
    under a temporary name (the caller renames it); a remote one in place, marked CREATING until its attrs are written."""
    aug, logits, fdtype = made.aug_layout, made.logits, made.feature_dtype
    g = target.open_group("w") if target.is_local else target.open_group("w", attributes={CREATING: True})
    specs = array_specs(n=len(samples[layout.LABELS]), views=cfg.views, k=teachers.num_teachers,
                        num_classes=made.dataset.num_classes, dtype=cfg.dtype, feature_dtype=fdtype,
                        compressor=cfg.compressor, logits=logits, aug=aug, block=block, heads=teachers.heads,
                        samples=sample_arrays(samples), shapes={name: shapes[name] for name in made.features})
    for spec in specs:
        spec.create(g)
    records = made.teachers  # the provenance of ``teachers``
    if test_acc is not None:  # not evaluated (--no-eval): no accuracy recorded
        records = tuple(replace(t, test_accuracy=acc) for t, acc in zip(records, test_acc, strict=True))
    attrs = replace(made, teachers=records, views=cfg.views, block_rows=block, camkd_version=camkd.__version__,
                    arrays=layout.describe_arrays(logits, int8=fdtype == "int8", aug=aug),
                    compression=f"zstd level {layout.ZSTD_LEVEL} on the view x sample arrays, before their crc32c"
                    if cfg.compressor == "zstd" else None,
                    feature_scale=layout.FEATURE_SCALE if fdtype == "int8" else None,
                    teacher_test_accuracy=test_acc).to_attrs()
    if target.is_local:
        g.attrs[layout.ATTRS_KEY] = attrs
    else:
        g.attrs.put({layout.ATTRS_KEY: attrs})  # one write replaces the CREATING mark: the store is whole from here on
    return g


def sample_arrays(samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-sample arrays as stored: the labels as int64 first, then the rest (an image folder's file listing)."""
    return {layout.LABELS: np.asarray(samples[layout.LABELS]).astype(np.int64),
            **{name: a for name, a in samples.items() if name != layout.LABELS}}


def append_views(g: zarr.Group, stored: StoreDescription, views: int) -> None:
    """Grow every per-view array of the store ``stored`` describes to ``views`` (new views are empty, their progress
    flags 0)."""
    for name in stored.view_arrays():
        a = g[name]
        a.resize((views,) + a.shape[1:])
    write_description(g, replace(stored, views=views))
