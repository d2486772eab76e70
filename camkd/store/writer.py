"""`camkd cache-teachers`: run the teachers once over V seeded views and write a Zarr store.

The unit of work is a (view, row block): the teachers run over the block's batches, a
background thread writes the block (one shard per array, so no two writes share a shard)
and only then sets the block's progress flag. Teacher outputs go straight into two per-block
buffers allocated once (one filled while the other is written), so a run allocates no
per-batch host arrays. A killed run resumes at the first block
without a flag; completed blocks are never recomputed, and because every block is computed
from the same batches, the finished store is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import errno
import re
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

import camkd
from camkd import dist
from camkd.data import Dataset, check_dataset, load_split
from camkd.data.views import AugSpec, augment
from camkd.device import resolve_device
from camkd.errors import CamkdError
from camkd.evaluate import evaluate
from camkd.progress import Bar, log
from camkd.store import layout as L
from camkd.store import topk as TK
from camkd.store.location import Location, listed_sizes, parse_location
from camkd.store.plan import block_rows_for, free_bytes, human, plan_store
from camkd.teachers import Teacher, load_teachers, parse_layer, run_teachers


@dataclass
class CacheConfig:
    teachers: list[str]
    dataset: str
    data_dir: str | None = None
    download: bool = False
    limit: int | None = None
    views: int = 1
    seed: int = 0
    features: list[str] = field(default_factory=lambda: ["penultimate"])  # what camkd (the default method) needs
    dtype: str = "float16"
    feature_dtype: str | None = None  # None: same as dtype; "int8": int8 with a float32 per-(sample, channel) scale
    compressor: str = "none"  # "zstd": zarr's ZstdCodec (level 3) on the view x sample arrays, before the crc32c
    batch_size: int | None = None  # None: per device (DEFAULT_BATCH)
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
    progress: bool = True
    options: dict = field(default_factory=dict)  # dataset loader options, e.g. synthetic's num_samples, num_classes
    dry_run: bool = False  # print the planned size and the free space, write nothing
    space_check: bool = True  # refuse to start when the planned store does not fit the free space
    evaluate: bool = True  # measure each teacher's test accuracy when creating the store
    logits: str = "dense"  # "topk:K": the k largest logits per teacher plus exact scalars (store/topk.py)
    kd_T: list[float] = field(default_factory=lambda: [4.0])  # top-k: the temperatures to distill at

    def out_path(self, teachers: list[Teacher]) -> Location:
        """Where the store goes: --out (a path, or an s3:// gs:// file:// URL), else cache/DATASET_ARCHS_sSEED.zarr."""
        if self.out:
            return parse_location(self.out)
        archs = "-".join(t.arch for t in teachers)
        return parse_location(Path("cache") / f"{self.dataset}_{archs}_s{self.seed}.zarr")


# teacher batch per device type: large enough to keep the device busy, small enough that the
# activations of one batch are reused by the allocator instead of mapped and unmapped each batch
DEFAULT_BATCH = {"cpu": 64, "cuda": 256}
IDENTITY_TEACHER_KEYS = ("arch", "sha256", "num_classes")  # not the path: the same weights from anywhere continue a store


def batch_size_for(cfg: CacheConfig, device: torch.device) -> int:
    if cfg.batch_size is not None:
        if cfg.batch_size < 1:
            raise CamkdError("--batch-size must be at least 1")
        return cfg.batch_size
    return DEFAULT_BATCH.get(device.type, 256)


def _identity(cfg: CacheConfig, teachers: list[Teacher], train: Dataset, spec: AugSpec, layers: dict, shapes: dict,
              logits: TK.LogitsSpec) -> dict:
    """Everything that must match for a store to be continued (not the number of views, not checkpoint paths)."""
    return {
        "format_version": L.FORMAT_VERSION,
        "dataset": {"name": train.name, "split": train.split, "n": len(train), "fingerprint": train.fingerprint,
                    "num_classes": train.num_classes, "in_channels": train.in_channels, "image_size": train.image_size},
        "augmentation": spec.to_dict(),
        "teachers": [{"arch": t.arch, "sha256": t.sha256, "num_classes": t.num_classes} for t in teachers],
        "dtype": cfg.dtype,
        "feature_dtype": cfg.feature_dtype or cfg.dtype,
        "compressor": cfg.compressor,
        "logits": logits.to_dict(),
        "features": {name: {"index": idx, "shapes": [list(s) for s in shapes[name]]} for name, idx in layers.items()},
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and a != b \
                and all(isinstance(x, dict) for x in a + b):  # e.g. teachers: name the field that differs
            for i, (x, y) in enumerate(zip(a, b)):
                out += _differences(x, y, f"{prefix}{key}.{i}.")
        elif a != b:
            out.append(f"{prefix}{key} (store: {_short(a)}, now: {_short(b)})")
    return out


def _short(v) -> str:
    s = str(v)
    return s if len(s) <= 70 else s[:67] + "..."


def _provenance(teachers: list[Teacher]) -> list[dict]:
    """What the store records of each teacher: its identity plus where it was read from."""
    return [{"arch": t.arch, "checkpoint": t.path.name, "path": str(t.path), "sha256": t.sha256,
             "num_classes": t.num_classes} for t in teachers]


CREATING = "camkd_creating"  # the only attr of a remote store whose creation has not finished


def _create(target: Location, ident: dict, cfg: CacheConfig, teachers: list[Teacher], train: Dataset, layers: dict,
            shapes: dict, test_acc: list[float] | None, batch: int, logits: TK.LogitsSpec) -> zarr.Group:
    """Write the group, every array's metadata, labels and heads, then the attrs. A local store is built under a
    temporary name (the caller renames it); a remote one in place, marked CREATING until its attrs are written."""
    n, k, c = len(train), len(teachers), train.num_classes
    np_dtype = L.DTYPES[cfg.dtype]
    itemsize = np.dtype(np_dtype).itemsize
    fdtype = cfg.feature_dtype or cfg.dtype
    f_np = L.FEATURE_DTYPES[fdtype]
    f_item = np.dtype(f_np).itemsize
    block = block_rows_for(k, c, itemsize, shapes, batch, n, feature_itemsize=f_item, scales=fdtype == "int8",
                           logits=logits)
    nblocks = L.num_blocks(n, block)
    g = target.open_group("w") if target.is_local else target.open_group("w", attributes={CREATING: True})
    crc = [Crc32cCodec()]
    # bytes-to-bytes codecs run in order when encoding: compress first, so the checksum covers the stored bytes
    view_codecs = ([ZstdCodec(level=L.ZSTD_LEVEL)] if cfg.compressor == "zstd" else []) + [Crc32cCodec()]

    def arr(name, shape, dtype, row_bytes, dims, fill=0):
        rows = L.plan_chunk_rows(row_bytes, block)
        chunks = (1, rows) + tuple(shape[2:])
        shards = (1, block) + tuple(shape[2:]) if rows < block else None
        return g.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards, compressors=view_codecs,
                              dimension_names=dims, fill_value=fill,
                              config={"write_empty_chunks": True})

    g.create_array("labels", data=train.labels.cpu().numpy().astype(np.int64), chunks=(min(n, 1 << 18),),
                   compressors=crc, dimension_names=("sample",))
    arr("aug", (cfg.views, n, 3), np.int16, 6, ("view", "sample", "param"))
    if logits.kind == "dense":
        arr("logits", (cfg.views, n, k, c), np_dtype, k * c * itemsize, ("view", "sample", "teacher", "class"))
    else:
        tk_dims = {"index": ("teacher", "rank"), "values": ("teacher", "rank"), "lse": ("teacher", "temperature"),
                   "log_tail": ("teacher", "temperature"), "ce": ("teacher",), "log_entropy": ("teacher",)}
        row = TK.row_bytes(logits, k, c, np_dtype)
        for name, shape in TK.shapes(logits, k).items():
            arr(f"topk/{name}", (cfg.views, n) + shape, TK.dtypes(logits, c, np_dtype)[name], row[name],
                ("view", "sample") + tk_dims[name])
    for name in layers:
        for t, s in enumerate(shapes[name]):
            arr(L.feature_path(name, t), (cfg.views, n) + tuple(s), f_np, int(np.prod(s)) * f_item,
                ("view", "sample", "channel", "height", "width"))
            if fdtype == "int8":
                arr(L.scale_path(name, t), (cfg.views, n, s[0]), np.float32, s[0] * 4, ("view", "sample", "channel"))
    for t, teacher in enumerate(teachers):
        for key, value in teacher.model.get_head().state_dict().items():
            data = value.detach().cpu().numpy()
            g.create_array(L.head_path(t, key), data=data, compressors=crc, dimension_names=L.HEAD_DIMS.get(data.ndim))
    g.create_array("progress", shape=(cfg.views, nblocks), dtype=np.uint8, chunks=(1, 1), fill_value=0,
                   dimension_names=("view", "block"))
    attrs = dict(ident)
    attrs["teachers"] = _provenance(teachers)
    attrs.update({
        "views": cfg.views, "block_rows": block, "camkd_version": camkd.__version__,
        "arrays": {"labels": "[N] int64", "aug": "[V, N, 3] int16 (dx, dy, flip)", "logits": "[V, N, K, C]",
                   "features/<layer>/t<k>": "[V, N, c, h, w] per teacher", "heads/t<k>/<param>": "teacher k's classifier head",
                   "progress": "[V, blocks] uint8, 1 = block durable"},
    })
    if logits.kind == "topk":
        del attrs["arrays"]["logits"]
        attrs["arrays"].update({
            "topk/index": f"[V, N, K, {logits.k}] class of each kept logit, largest first",
            "topk/values": f"[V, N, K, {logits.k}] the kept logits",
            "topk/lse": "[V, N, K, len(kd_T)] float32 logsumexp(z / T) per cached T",
            "topk/log_tail": "[V, N, K, len(kd_T)] float32 log of the mass at T outside the kept classes",
            "topk/ce": "[V, N, K] float32 cross-entropy against the label at T = 1",
            "topk/log_entropy": "[V, N, K] float32 log entropy at T = 1"})
    if cfg.compressor == "zstd":
        attrs["compression"] = f"zstd level {L.ZSTD_LEVEL} on the view x sample arrays, before their crc32c"
    if fdtype == "int8":
        attrs["feature_scale"] = L.FEATURE_SCALE
        attrs["arrays"]["features/<layer>/t<k>"] = "[V, N, c, h, w] int8 per teacher; feature = q * scale"
        attrs["arrays"]["features/<layer>/t<k>_scale"] = "[V, N, c] float32 per teacher"
    if test_acc is not None:  # not evaluated (--no-eval): no accuracy recorded
        attrs["teacher_test_accuracy"] = test_acc
        for t, acc in enumerate(test_acc):
            attrs["teachers"][t]["test_accuracy"] = acc
    if target.is_local:
        g.attrs[L.ATTRS_KEY] = attrs
    else:
        g.attrs.put({L.ATTRS_KEY: attrs})  # one write replaces the CREATING mark: the store is whole from here on
    return g


def _append_views(g: zarr.Group, views: int) -> None:
    """Grow every per-view array to ``views`` (new views are empty, their progress flags 0)."""
    attrs = g.attrs[L.ATTRS_KEY]
    names = ["aug", "progress"] + logit_arrays(TK.LogitsSpec.from_attrs(attrs))
    names += [L.feature_path(n, t) for n, spec in attrs["features"].items() for t in range(len(spec["shapes"]))]
    if L.feature_dtype(attrs) == "int8":
        names += [L.scale_path(n, t) for n, spec in attrs["features"].items() for t in range(len(spec["shapes"]))]
    for name in names:
        a = g[name]
        a.resize((views,) + a.shape[1:])
    attrs["views"] = views
    g.attrs[L.ATTRS_KEY] = attrs


def logit_arrays(spec: TK.LogitsSpec) -> list[str]:
    """The arrays that hold a store's logits: ``logits``, or the ``topk/`` arrays."""
    return ["logits"] if spec.kind == "dense" else [f"topk/{name}" for name in TK.ARRAYS]


_PARTIAL = re.compile(r".+\.[0-9a-f]{32}\.partial")


class _Block:
    """Host buffers of one row block (aug, logits, per-layer per-teacher features), filled in place batch by batch."""

    def __init__(self, rows: int, k: int, c: int, np_dtype, layers: dict, shapes: dict, feat_dtype=None,
                 logits: TK.LogitsSpec = TK.DENSE) -> None:
        """``feat_dtype``: the features' buffer dtype (float32 for int8 stores: quantized by the writer), default np_dtype."""
        self.aug = np.empty((rows, 3), dtype=np.int16)
        self.spec = logits
        if logits.kind == "dense":
            self.logits = {"logits": np.empty((rows, k, c), dtype=np_dtype)}
        else:
            dt = TK.dtypes(logits, c, np_dtype)
            self.logits = {f"topk/{name}": np.empty((rows,) + shape, dtype=dt[name]) for name, shape in TK.shapes(logits, k).items()}
        fd = np_dtype if feat_dtype is None else feat_dtype
        self.feats = {name: [np.empty((rows,) + tuple(s), dtype=fd) for s in shapes[name]] for name in layers}
        self.pending: Future | None = None  # the write of the block these buffers hold

    def put(self, s: int, params: torch.Tensor, logits: torch.Tensor, feats: dict[str, list[torch.Tensor]],
            labels: torch.Tensor | None = None) -> None:
        """Copy one batch's outputs into rows s: (dtype conversion and device-to-host copy in one pass, no temporaries).
        ``labels``: the batch's labels (a top-k store's cross-entropies need them)."""
        e = s + len(logits)
        torch.from_numpy(self.aug[s:e]).copy_(params)
        if self.spec.kind == "dense":
            torch.from_numpy(self.logits["logits"][s:e]).copy_(logits)
        else:
            for name, value in TK.compute(logits, labels, self.spec).items():
                torch.from_numpy(self.logits[f"topk/{name}"][s:e]).copy_(value)  # cast and copy to the host in one pass
        for name, per_teacher in feats.items():
            for buf, f in zip(self.feats[name], per_teacher):
                torch.from_numpy(buf[s:e]).copy_(f)


class _Writer:
    """Writes finished blocks on one background thread (concurrent.futures); errors re-raise in the caller.

    A block's progress flag is set in the same task after all its arrays are written. After a
    failed write no later block is written, so a flag never follows a failure.
    """

    def __init__(self, g: zarr.Group, layer_names: list[str], k: int, *, int8: bool = False,
                 logit_names: list[str] | None = None) -> None:
        self.g, self.layer_names, self.k, self.int8 = g, layer_names, k, int8
        self.logit_names = logit_names or ["logits"]
        # opened once: on object storage each g[name] is a metadata GET
        names = ["aug", "progress"] + self.logit_names + [L.feature_path(name, t) for name in layer_names for t in range(k)]
        if int8:
            names += [L.scale_path(name, t) for name in layer_names for t in range(k)]
        self.arrays = {name: g[name] for name in names}
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
            a["aug"][v, rows] = blk.aug[:m]
            for name in self.logit_names:
                a[name][v, rows] = blk.logits[name][:m]
            for name in self.layer_names:
                for t in range(self.k):
                    if self.int8:  # quantized here, on the writer thread, vectorised over the block
                        q, scale = L.quantize(blk.feats[name][t][:m])
                        a[L.feature_path(name, t)][v, rows] = q
                        a[L.scale_path(name, t)][v, rows] = scale
                    else:
                        a[L.feature_path(name, t)][v, rows] = blk.feats[name][t][:m]
            a["progress"][v, b] = 1  # only after every array of the block is written
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


def _feature_shapes(teachers: list[Teacher], train: Dataset, layers: dict, device: torch.device) -> dict:
    x = torch.zeros((1,) + tuple(train.images.shape[1:]), dtype=torch.float32, device=device)
    shapes: dict[str, list[tuple]] = {name: [] for name in layers}
    for t in teachers:
        with torch.inference_mode():
            feats, _ = t.model(x, is_feat=True)
        for name, idx in layers.items():
            if not -len(feats) <= idx < len(feats):
                raise CamkdError(f"--features {name}: {t.arch} has only {len(feats)} feature outputs (indices 0..{len(feats) - 1})")
            if feats[idx].ndim != 4:
                raise CamkdError(f"--features {name}: {t.arch}'s feature {idx} is not a feature map; pick another index")
            shapes[name].append(tuple(feats[idx].shape[1:]))
    return shapes


def _load(cfg: CacheConfig, split: str, device: torch.device) -> Dataset:
    return load_split(cfg.dataset, split, device=device, data_dir=cfg.data_dir, download=cfg.download, limit=cfg.limit,
                      **cfg.options)


def _check_teachers(teachers: list[Teacher], train: Dataset) -> None:
    for t in teachers:
        if t.num_classes != train.num_classes:
            raise CamkdError(f"teacher {t.path} has {t.num_classes} classes but {train.name} has {train.num_classes}; "
                             "use teachers trained on this dataset")
        if t.in_channels != train.in_channels:
            raise CamkdError(f"teacher {t.path} takes {t.in_channels}-channel images but {train.name} has {train.in_channels}")


def parse_layers(texts: list[str]) -> dict[str, int]:
    """--features values -> {layer name: feature index}; 'none' alone stores no features."""
    if len(texts) > 1 and any(t.strip().lower() == "none" for t in texts):
        raise CamkdError(f"-f none stores no features, but layers are given too ({', '.join(texts)}); give either none "
                         "or the layers")
    layers = {}
    for text in texts:
        parsed = parse_layer(text)
        if parsed is not None:
            layers[parsed[0]] = parsed[1]
    return layers


def cache_teachers(cfg: CacheConfig) -> dict:
    """Write (or continue, or extend) the store; returns a summary for the report.

    Under torchrun, rank 0 alone creates or extends the store's metadata; every rank then computes
    its share of the unfinished (view, block) units, each written whole by one rank with its own
    progress flag, so the store is byte-identical for any number of ranks and resumes under another.
    """
    if not cfg.teachers:
        raise CamkdError("give at least one --teacher CKPT (or ARCH=CKPT for a reference checkpoint)")
    if cfg.views < 1:
        raise CamkdError("--views must be at least 1")
    if cfg.dtype not in L.DTYPES:
        raise CamkdError(f"unknown --dtype '{cfg.dtype}'; choose float16 or float32")
    if cfg.feature_dtype is not None and cfg.feature_dtype not in L.FEATURE_DTYPES:
        raise CamkdError(f"unknown --feature-dtype '{cfg.feature_dtype}'; choose float16, float32 or int8")
    if cfg.compressor not in L.COMPRESSORS:
        raise CamkdError(f"unknown --compressor '{cfg.compressor}'; choose none or zstd")
    check_dataset(cfg.dataset)
    layers = parse_layers(cfg.features)
    TK.parse_logits(cfg.logits, cfg.kd_T)  # the syntax, before anything loads
    device = dist.device_for(resolve_device(cfg.device))
    world = dist.init(device)
    batch = batch_size_for(cfg, device)
    with dist.agree("loading the teachers and the data"):
        teachers = load_teachers(cfg.teachers, device=device)
        train = _load(cfg, "train", device)
        _check_teachers(teachers, train)
        shapes = _feature_shapes(teachers, train, layers, device)
        lspec = TK.parse_logits(cfg.logits, cfg.kd_T, train.num_classes)
    spec = AugSpec(seed=cfg.seed, norm=train.norm)
    ident = _identity(cfg, teachers, train, spec, layers, shapes, lspec)
    path = cfg.out_path(teachers)
    # decided by every rank before rank 0 changes anything
    creating = not path.exists() or cfg.overwrite or _half_created(path)
    plan = _plan(cfg, path, creating, teachers, train, shapes, batch, world, lspec)
    if cfg.dry_run:
        return {"dry_run": True, "path": str(path), "plan": plan}
    test_acc = _test_accuracy(cfg, teachers, device, batch, world) if creating else None
    with dist.agree("creating or opening the store"):
        if world.main:
            _open_or_create(path, ident, cfg, teachers, train, layers, shapes, test_acc, batch, lspec)
    g = path.open_group("r+")
    return _fill(g, path, cfg, teachers, train, spec, layers, shapes, batch, world)


def _plan(cfg: CacheConfig, path: Location, creating: bool, teachers, train: Dataset, shapes: dict, batch: int,
          world: dist.World, logits: TK.LogitsSpec = TK.DENSE) -> list[str]:
    """Print the store's planned size and the free space before writing; refuse when it cannot fit."""
    k, c, item = len(teachers), train.num_classes, np.dtype(L.DTYPES[cfg.dtype]).itemsize
    fdtype = cfg.feature_dtype or cfg.dtype
    stored, views = 0, cfg.views
    block = block_rows_for(k, c, item, shapes, batch, len(train), feature_itemsize=np.dtype(L.FEATURE_DTYPES[fdtype]).itemsize,
                           scales=fdtype == "int8", logits=logits)
    if not creating:
        try:
            g = path.open_group("r")
            attrs = g.attrs[L.ATTRS_KEY]
            views, block = max(views, attrs["views"]), attrs["block_rows"]
            stored = sum(array_sizes(g).values())
        except Exception:  # noqa: BLE001 - not a readable store: _open_or_create says what is wrong
            pass
    plan = plan_store(n=len(train), views=views, k=k, num_classes=c, dtype=cfg.dtype, shapes=shapes, block_rows=block,
                      feature_dtype=fdtype, compressor=cfg.compressor, logits=logits)
    need = max(plan.total - stored, 0)
    if not path.is_local:  # object storage reports no free space: nothing to refuse on
        lines = plan.lines() + [f"free space at {path}: not checked (object storage); still to write: {human(need)}"]
        if world.main and cfg.progress and not cfg.dry_run:
            for line in lines:
                log(line)
        return lines
    local = path.local_path
    free = free_bytes(local)
    lines = plan.lines() + [f"free at {local.absolute().parent}: {human(free)}; still to write: {human(need)}"]
    if world.main and cfg.progress and not cfg.dry_run:  # a dry run returns the lines for the caller to print
        for line in lines:
            log(line)
    if need > free and cfg.space_check and not cfg.dry_run:
        bound = " (an upper bound: compression not counted)" if plan.compressed else ""
        raise CamkdError(f"{path} needs {human(need)}{bound} more but {local.absolute().parent} has {human(free)} free; free space, "
                         "cache fewer views (-V), float16 (--dtype) or fewer features (-f), choose another --out, or add "
                         "--no-space-check if the estimate is wrong for this storage")
    return lines


def _test_accuracy(cfg: CacheConfig, teachers: list[Teacher], device: torch.device, batch: int,
                   world: dist.World) -> list[float] | None:
    """Each teacher's top-1 on the test split (recorded in the store), or None with evaluate=False.
    Under torchrun each rank evaluates a disjoint slice and the counts are summed."""
    if not cfg.evaluate:
        return None
    with dist.agree("loading the test split"):
        test = _load(cfg, "test", device)
    if world.active:
        lo, hi = len(test) * world.rank // world.size, len(test) * (world.rank + 1) // world.size
        test = Dataset(test.name, test.split, test.images[lo:hi], test.labels[lo:hi], test.num_classes, test.norm)
    if cfg.progress and world.main:
        log(f"evaluating {len(teachers)} teachers on the {test.name} test split ({len(test)} images; --no-eval skips this)")
    out = []
    with Bar("evaluating", len(teachers) * len(test), enabled=cfg.progress and world.main) as bar:
        for t, teacher in enumerate(teachers):
            out.append(evaluate(teacher.model, test, batch_size=batch)["top1"])
            bar.update(len(test), f"teacher {t + 1}/{len(teachers)}")
    return out


def _half_created(loc: Location) -> bool:
    """A remote store whose creation was interrupted (its attrs still the CREATING mark): to be created anew."""
    if loc.is_local or not loc.is_zarr():
        return False
    try:
        attrs = dict(loc.open_group("r").attrs)
    except Exception:  # noqa: BLE001 - not a readable group: _open_existing says what is wrong
        return False
    return attrs.get(CREATING) is True and L.ATTRS_KEY not in attrs


def _open_or_create(path: Location, ident: dict, cfg: CacheConfig, teachers, train, layers, shapes, test_acc,
                    batch: int, logits: TK.LogitsSpec) -> None:
    if path.exists() and (cfg.overwrite or _half_created(path)):
        if path.is_local:
            local = path.local_path
            if not local.is_dir() or (not (local / "zarr.json").exists() and any(local.iterdir())):
                raise CamkdError(f"{path} exists and is not a Zarr store; refusing to delete it even with --overwrite")
        elif not path.is_zarr():
            raise CamkdError(f"{path} holds objects but no Zarr store; refusing to delete them even with --overwrite")
        if not cfg.overwrite:
            log(f"{path}: its creation was interrupted; creating it anew")
        path.delete()
    if path.exists():
        g = _open_existing(path)
        attrs = g.attrs[L.ATTRS_KEY]
        old = {k: attrs.get(k) for k in ident}
        old["feature_dtype"] = L.feature_dtype(attrs)  # stores made before these attrs: float features, uncompressed
        old["compressor"] = attrs.get("compressor", "none")
        old["logits"] = attrs.get("logits", {"kind": "dense"})
        old["teachers"] = [{k: t.get(k) for k in IDENTITY_TEACHER_KEYS} for t in attrs["teachers"]]
        diff = _differences(old, ident)
        if diff:
            diff.sort(key=lambda d: not d.split(" (")[0].endswith("name"))  # a differing name first (dataset.name: the data)
            more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
            raise CamkdError(f"{path} was made differently: {'; '.join(diff[:3])}{more}; use --overwrite to replace it or "
                             "another --out")
        if path.is_local:  # object stores have no temporary files: a PUT is whole or absent
            for f in path.local_path.rglob("*.partial"):  # zarr's temporary files of a write that a kill interrupted
                if _PARTIAL.fullmatch(f.name):
                    f.unlink(missing_ok=True)
        if cfg.views > attrs["views"]:
            log(f"extending {path} from {attrs['views']} to {cfg.views} views")
            _append_views(g, cfg.views)
        return
    if not path.is_local:
        # no rename on object storage: metadata written in place, marked CREATING until the attrs are written
        # (a rerun after a kill creates it anew); the progress flags make the filling resumable as on disk
        try:
            _create(path, ident, cfg, teachers, train, layers, shapes, test_acc, batch, logits)
        except OSError as e:
            raise CamkdError(f"cannot create {path}: {e.strerror or e}; rerun the same command") from None
        return
    local = path.local_path
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CamkdError(f"cannot create {local.parent}: {e.strerror}") from None
    # built under a temporary name and renamed when whole: a run killed while creating leaves no half store
    tmp = local.with_name(f".{local.name}.camkd-creating")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        _create(parse_location(tmp), ident, cfg, teachers, train, layers, shapes, test_acc, batch, logits)
        tmp.rename(local)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CamkdError(f"cannot create {path}: {what}") from None


def _open_existing(path: Location) -> zarr.Group:
    try:
        g = path.open_group("r+")
    except CamkdError:
        raise
    except Exception:
        hint = " or add --overwrite" if path.is_zarr() else ""  # --overwrite deletes only Zarr stores
        raise CamkdError(f"{path} exists and is not a camkd store; choose another --out{hint}") from None
    attrs = g.attrs.get(L.ATTRS_KEY)
    if not isinstance(attrs, dict) or "format_version" not in attrs:
        raise CamkdError(f"{path} is a Zarr group but not a camkd store; choose another --out or add --overwrite")
    if attrs["format_version"] != L.FORMAT_VERSION:
        raise CamkdError(f"{path} has store format {attrs['format_version']}, this camkd writes {L.FORMAT_VERSION}; use --overwrite")
    return g


def _fill(g: zarr.Group, path: Location, cfg: CacheConfig, teachers, train: Dataset, spec: AugSpec, layers: dict,
          shapes: dict, batch: int, world: dist.World) -> dict:
    attrs = g.attrs[L.ATTRS_KEY]
    n, block, views = len(train), attrs["block_rows"], attrs["views"]
    done = np.asarray(g["progress"][:])
    todo = [(v, b) for v in range(views) for b in range(done.shape[1]) if not done[v, b]]
    mine = todo[world.rank :: world.size]  # unit i goes to rank i mod W: one writer per unit
    rows = sum(L.block_slice(b, n, block).stop - L.block_slice(b, n, block).start for _, b in mine)
    if done.any() and todo and world.main:
        log(f"resuming {path}: {int(done.sum())} of {done.size} blocks already written")
    t0 = time.perf_counter()
    with dist.agree("writing the store"):
        if mine:
            _compute(g, path, cfg, teachers, train, spec, layers, shapes, batch, mine, rows, show=world.main)
    elapsed = time.perf_counter() - t0
    rows_all = int(dist.all_sum(torch.tensor([rows], dtype=torch.int64, device=train.images.device)).item())
    if not world.main:
        return {"path": str(path), "rows_computed": rows, "seconds": elapsed}
    record_tail_mass(g, path)
    return summarize(g, path, rows_all, elapsed)


def record_tail_mass(g: zarr.Group, path: Location) -> None:
    """A finished top-k store: each teacher's tail mass (mean, 99th percentile, max over every sample-view) per
    cached temperature, into the attrs (``topk_tail_mass``), so a user sees what k costs."""
    attrs = g.attrs[L.ATTRS_KEY]
    spec = TK.LogitsSpec.from_attrs(attrs)
    if spec.kind != "topk" or not np.asarray(g["progress"][:]).all():
        return
    attrs["topk_tail_mass"] = TK.tail_summary(_read(g, path, "topk/log_tail", slice(None), ""), spec.temperatures)
    g.attrs[L.ATTRS_KEY] = attrs


def _compute(g: zarr.Group, path: Location, cfg: CacheConfig, teachers, train: Dataset, spec: AugSpec, layers: dict,
             shapes: dict, batch: int, todo: list[tuple[int, int]], todo_rows: int, *, show: bool = True) -> None:
    """Run the teachers over the unfinished blocks; block i is computed while block i - 1 is written."""
    n, k, block, views = len(train), len(teachers), g.attrs[L.ATTRS_KEY]["block_rows"], g.attrs[L.ATTRS_KEY]["views"]
    rows_max = min(block, n)
    int8 = L.feature_dtype(g.attrs[L.ATTRS_KEY]) == "int8"
    fd = np.float32 if int8 else L.FEATURE_DTYPES[L.feature_dtype(g.attrs[L.ATTRS_KEY])]
    lspec = TK.LogitsSpec.from_attrs(g.attrs[L.ATTRS_KEY])
    buffers = [_Block(rows_max, k, train.num_classes, L.DTYPES[cfg.dtype], layers, shapes, fd, lspec) for _ in range(2)]
    writer = _Writer(g, list(layers), k, int8=int8, logit_names=logit_arrays(lspec))
    try:
        with Bar("caching", todo_rows, enabled=cfg.progress and show) as bar:
            for i, (v, b) in enumerate(todo):
                blk = buffers[i % 2]
                _wait(blk)
                rows = L.block_slice(b, n, block)
                m = rows.stop - rows.start
                for s in range(0, m, batch):
                    idx = torch.arange(rows.start + s, rows.start + min(s + batch, m))
                    x, params = augment(train.images, idx, spec, view=v)
                    logits, feats = run_teachers(teachers, x, layers)
                    blk.put(s, params, logits, feats, train.labels[idx.to(train.labels.device)])
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


VIEW_ARRAYS_PREFIXES = ("aug", "logits", "topk/", "features/")


def summarize(g: zarr.Group, path: Location, rows_done: int, elapsed: float) -> dict:
    """Per-view teacher accuracy from the stored logits, sizes per array, the layers the store holds."""
    attrs = g.attrs[L.ATTRS_KEY]
    labels = _read(g, path, "labels", slice(None), "")
    acc = []
    topk = TK.LogitsSpec.from_attrs(attrs).kind == "topk"
    for v in range(attrs["views"]):
        if topk:  # the first kept class is the top-1
            top1 = _read(g, path, "topk/index", (v, slice(None), slice(None), 0), f"view {v} ").astype(np.int64)
        else:
            top1 = _read(g, path, "logits", v, f"view {v} ").argmax(-1)
        acc.append([float((top1[:, t] == labels).mean() * 100) for t in range(top1.shape[1])])
    sizes = array_sizes(g)
    n, views = len(labels), attrs["views"]
    return {"path": str(path), "views": views, "n": n, "rows_computed": rows_done, "seconds": elapsed,
            "samples_per_s": rows_done / max(elapsed, 1e-9), "view_accuracy": acc,
            "teachers": [t["arch"] for t in attrs["teachers"]], "store_bytes": sum(sizes.values()),
            "layers": sorted(attrs["features"]),
            "bytes_per_sample_view": bytes_per_sample_view(sizes, n, views)}


def bytes_per_sample_view(sizes: dict[str, int], n: int, views: int) -> dict[str, float]:
    """Stored bytes of each per-view array divided by N x V (what one more view or sample costs)."""
    return {name: size / max(n * views, 1) for name, size in sizes.items() if name.startswith(VIEW_ARRAYS_PREFIXES)}


def _read(g: zarr.Group, path: Location, name: str, sel, what: str) -> np.ndarray:
    try:
        return np.asarray(g[name][sel])
    except Exception as e:  # a corrupt chunk of a finished block: zarr raises codec / IO errors of several types
        raise CamkdError(f"{path}: array '{name}' {what}cannot be read (a chunk {L.read_failure(e)}); "
                         f"run 'camkd cache-verify {path} --repair', then rerun the same cache-teachers command") from None


def array_sizes(g: zarr.Group) -> dict[str, int]:
    """Bytes stored of every array (zarr's nbytes_stored: every object under the array, shards whole, metadata).
    On object storage from one listing of the store (a request per 1000 objects) instead of a HEAD per object."""
    listed = listed_sizes(g)
    if listed is None:
        return {name: arr.nbytes_stored() for name, arr in walk_arrays(g)}
    base = g.store_path.path
    out = {}
    for name, _ in walk_arrays(g):
        prefix = f"{base}/{name}/" if base else f"{name}/"
        out[name] = sum(size for key, size in listed.items() if key.startswith(prefix))
    return out


def walk_arrays(g: zarr.Group):
    """(path, array) of every array in the group, at any depth."""
    for name, node in g.members(max_depth=None):
        if isinstance(node, zarr.Array):
            yield name, node
