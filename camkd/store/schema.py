"""The store's shape on storage: every array's metadata, labels, heads and attrs (create), and more views (append).

Arrays, chunks and codecs as layout.py defines them: each [V, N, ...] array stores one object per
(view, row block), a shard of several chunks when a block exceeds the chunk target; zstd (if asked)
runs before the crc32c, so the checksum covers the stored bytes.
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

import camkd
from camkd.store import layout, topk
from camkd.store.config import CacheConfig
from camkd.store.location import Location
from camkd.store.runner import TeacherRunner

CREATING = "camkd_creating"  # the only attr of a remote store whose creation has not finished


def create(target: Location, ident: dict, cfg: CacheConfig, teachers: TeacherRunner, samples: dict[str, np.ndarray],
           shapes: dict, test_acc: list[float] | None, block: int) -> zarr.Group:
    """Write the group, every array's metadata, the per-sample arrays (``samples``: the labels, and an image folder's
    file listing) and heads, then the attrs. A local store is built under a temporary name (the caller renames it);
    a remote one in place, marked CREATING until its attrs are written."""
    labels = samples[layout.LABELS]
    n, k, c = len(labels), teachers.num_teachers, ident["dataset"]["num_classes"]
    aug = layout.aug_layout(ident["augmentation"])
    logits = topk.LogitsSpec.from_attrs(ident)
    np_dtype = layout.DTYPES[cfg.dtype]
    itemsize = np.dtype(np_dtype).itemsize
    fdtype = cfg.stored_feature_dtype
    f_np = layout.FEATURE_DTYPES[fdtype]
    f_item = np.dtype(f_np).itemsize
    g = target.open_group("w") if target.is_local else target.open_group("w", attributes={CREATING: True})
    crc = [Crc32cCodec()]
    view_codecs = ([ZstdCodec(level=layout.ZSTD_LEVEL)] if cfg.compressor == "zstd" else []) + [Crc32cCodec()]

    def arr(name, shape, dtype, row_bytes, dims):
        rows = layout.plan_chunk_rows(row_bytes, block)
        chunks = (1, rows) + tuple(shape[2:])
        shards = (1, block) + tuple(shape[2:]) if rows < block else None
        return g.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards, compressors=view_codecs,
                              dimension_names=dims, fill_value=0, config={"write_empty_chunks": True})

    g.create_array(layout.LABELS, data=labels.astype(np.int64), chunks=(min(n, 1 << 18),), compressors=crc,
                   dimension_names=("sample",))
    for name, data in samples.items():
        if name != layout.LABELS:
            g.create_array(name, data=data, chunks=(min(n, 1 << 18),), compressors=crc, dimension_names=("sample",))
    width, item = len(aug.params), np.dtype(aug.dtype).itemsize
    arr(layout.AUG, (cfg.views, n, width), aug.dtype, width * item, layout.VIEW_DIMS + ("param",))
    if aug.pixels:
        arr(layout.PIXELS, (cfg.views, n), np.uint32, 4, layout.VIEW_DIMS)
    if logits.kind == "dense":
        arr(layout.LOGITS, (cfg.views, n, k, c), np_dtype, k * c * itemsize, layout.VIEW_DIMS + ("teacher", "class"))
    else:
        row = topk.row_bytes(logits, k, c, np_dtype)
        for name, shape in topk.shapes(logits, k).items():
            arr(layout.topk_path(name), (cfg.views, n) + shape, topk.dtypes(logits, c, np_dtype)[name], row[name],
                layout.VIEW_DIMS + layout.TOPK_DIMS[name])
    for name in ident["features"]:
        for t, s in enumerate(shapes[name]):
            arr(layout.feature_path(name, t), (cfg.views, n) + tuple(s), f_np, int(np.prod(s)) * f_item, layout.FEATURE_DIMS)
            if fdtype == "int8":
                arr(layout.scale_path(name, t), (cfg.views, n, s[0]), np.float32, s[0] * 4, layout.SCALE_DIMS)
    for t, head in enumerate(teachers.heads):
        for key, data in head.items():
            g.create_array(layout.head_path(t, key), data=data, compressors=crc, dimension_names=layout.HEAD_DIMS.get(data.ndim))
    g.create_array(layout.PROGRESS, shape=(cfg.views, layout.num_blocks(n, block)), dtype=np.uint8, chunks=(1, 1),
                   fill_value=0, dimension_names=("view", "block"))
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
