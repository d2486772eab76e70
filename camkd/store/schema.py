"""The store's shape on storage: every array's metadata, labels, heads and attrs (create), and more views (append).

The arrays are those of arrays.py's list (the one plan.py counts), chunked as layout.py defines.
"""

from __future__ import annotations

import numpy as np
import zarr

import camkd
from camkd.store import layout, topk
from camkd.store.arrays import array_specs
from camkd.store.config import CacheConfig
from camkd.store.location import Location
from camkd.store.runner import TeacherRunner

CREATING = "camkd_creating"  # the only attr of a remote store whose creation has not finished


def create(target: Location, ident: dict, cfg: CacheConfig, teachers: TeacherRunner, samples: dict[str, np.ndarray],
           shapes: dict, test_acc: list[float] | None, block: int) -> zarr.Group:
    """Write the group, every array's metadata, the per-sample arrays (``samples``: the labels, and an image folder's
    file listing) and heads, then the attrs. A local store is built under a temporary name (the caller renames it);
    a remote one in place, marked CREATING until its attrs are written."""
    aug = layout.aug_layout(ident["augmentation"])
    logits = topk.LogitsSpec.from_attrs(ident)
    fdtype = cfg.stored_feature_dtype
    g = target.open_group("w") if target.is_local else target.open_group("w", attributes={CREATING: True})
    specs = array_specs(n=len(samples[layout.LABELS]), views=cfg.views, k=teachers.num_teachers,
                        num_classes=ident["dataset"]["num_classes"], dtype=cfg.dtype, feature_dtype=fdtype,
                        compressor=cfg.compressor, logits=logits, aug=aug, block=block, heads=teachers.heads,
                        samples=sample_arrays(samples), shapes={name: shapes[name] for name in ident["features"]})
    for spec in specs:
        spec.create(g)
    attrs = dict(ident)
    attrs["teachers"] = teachers.provenance
    attrs.update({"views": cfg.views, "block_rows": block, "camkd_version": camkd.__version__,
                  "arrays": layout.describe_arrays(logits, int8=fdtype == "int8", aug=aug)})
    if cfg.compressor == "zstd":
        attrs["compression"] = f"zstd level {layout.ZSTD_LEVEL} on the view x sample arrays, before their crc32c"
    if fdtype == "int8":
        attrs["feature_scale"] = layout.FEATURE_SCALE
    if test_acc is not None:  # not evaluated (--no-eval): no accuracy recorded
        attrs["teacher_test_accuracy"] = test_acc
        attrs["teachers"] = [dict(meta, test_accuracy=acc) for meta, acc in zip(attrs["teachers"], test_acc, strict=True)]
    if target.is_local:
        g.attrs[layout.ATTRS_KEY] = attrs
    else:
        g.attrs.put({layout.ATTRS_KEY: attrs})  # one write replaces the CREATING mark: the store is whole from here on
    return g


def sample_arrays(samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-sample arrays as stored: the labels as int64 first, then the rest (an image folder's file listing)."""
    return {layout.LABELS: np.asarray(samples[layout.LABELS]).astype(np.int64),
            **{name: a for name, a in samples.items() if name != layout.LABELS}}


def append_views(g: zarr.Group, views: int) -> None:
    """Grow every per-view array to ``views`` (new views are empty, their progress flags 0)."""
    attrs = g.attrs[layout.ATTRS_KEY]
    names = [layout.AUG, layout.PROGRESS] + layout.logit_arrays(topk.LogitsSpec.from_attrs(attrs)) + layout.feature_arrays(attrs)
    if layout.aug_layout(attrs["augmentation"]).pixels:
        names.append(layout.PIXELS)
    for name in names:
        a = g[name]
        a.resize((views,) + a.shape[1:])
    attrs["views"] = views
    g.attrs[layout.ATTRS_KEY] = attrs
