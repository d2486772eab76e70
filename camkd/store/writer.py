"""`camkd cache-teachers`: run the teachers once over V seeded views and write a Zarr store.

The unit of work is a (view, row block): the teachers run over the block's batches, a
background thread writes the block (one shard per array, so no two writes share a shard)
and only then sets the block's progress flag. A killed run resumes at the first block
without a flag; completed blocks are never recomputed, and because every block is computed
from the same batches, the finished store is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import errno
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

import camkd
from camkd.datasets import Dataset
from camkd.device import resolve_device
from camkd.errors import CamkdError
from camkd.loop import evaluate
from camkd.progress import Bar, log
from camkd.store import layout as L
from camkd.teachers import Teacher, load_teacher, parse_layer, run_teachers
from camkd.train import load_split
from camkd.views import AugSpec, augment


@dataclass
class CacheConfig:
    teachers: list[str]
    dataset: str
    data_dir: str | None = None
    download: bool = False
    limit: int | None = None
    views: int = 1
    seed: int = 0
    features: list[str] = field(default_factory=list)
    dtype: str = "float16"
    batch_size: int = 256
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
    progress: bool = True
    synthetic_samples: int | None = None
    synthetic_classes: int | None = None

    def out_path(self, teachers: list[Teacher]) -> Path:
        if self.out:
            return Path(self.out)
        archs = "-".join(t.arch for t in teachers)
        return Path("cache") / f"{self.dataset}_{archs}_s{self.seed}.zarr"


def _identity(cfg: CacheConfig, teachers: list[Teacher], train: Dataset, spec: AugSpec, layers: dict, shapes: dict) -> dict:
    """Everything that must match for a store to be continued (not the number of views)."""
    return {
        "format_version": L.FORMAT_VERSION,
        "dataset": {"name": train.name, "split": train.split, "n": len(train), "fingerprint": train.fingerprint,
                    "num_classes": train.num_classes, "in_channels": train.in_channels, "image_size": train.image_size},
        "augmentation": spec.to_dict(),
        "teachers": [{"arch": t.arch, "checkpoint": t.path.name, "sha256": t.sha256, "num_classes": t.num_classes} for t in teachers],
        "dtype": cfg.dtype,
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


def _bytes_per_row(k: int, c: int, itemsize: int, shapes: dict) -> int:
    total = k * c * itemsize + 6
    for per_teacher in shapes.values():
        total += sum(int(np.prod(s)) for s in per_teacher) * itemsize
    return total


def _create(path: Path, ident: dict, cfg: CacheConfig, teachers: list[Teacher], train: Dataset, layers: dict,
            shapes: dict, test_acc: list[float]) -> zarr.Group:
    n, k, c = len(train), len(teachers), train.num_classes
    np_dtype = L.DTYPES[cfg.dtype]
    itemsize = np.dtype(np_dtype).itemsize
    block = L.plan_block_rows(_bytes_per_row(k, c, itemsize, shapes), cfg.batch_size, n)
    nblocks = L.num_blocks(n, block)
    g = zarr.open_group(str(path), mode="w")
    crc = [Crc32cCodec()]

    def arr(name, shape, dtype, row_bytes, dims, fill=0):
        rows = L.plan_chunk_rows(row_bytes, block)
        chunks = (1, rows) + tuple(shape[2:])
        shards = (1, block) + tuple(shape[2:]) if rows < block else None
        return g.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards, compressors=crc,
                              dimension_names=dims, fill_value=fill,
                              config={"write_empty_chunks": True})

    g.create_array("labels", data=train.labels.cpu().numpy().astype(np.int64), chunks=(min(n, 1 << 18),),
                   compressors=crc, dimension_names=("sample",))
    arr("aug", (cfg.views, n, 3), np.int16, 6, ("view", "sample", "param"))
    arr("logits", (cfg.views, n, k, c), np_dtype, k * c * itemsize, ("view", "sample", "teacher", "class"))
    for name in layers:
        for t, s in enumerate(shapes[name]):
            arr(L.feature_path(name, t), (cfg.views, n) + tuple(s), np_dtype, int(np.prod(s)) * itemsize,
                ("view", "sample", "channel", "height", "width"))
    for t, teacher in enumerate(teachers):
        for key, value in teacher.model.get_head().state_dict().items():
            data = value.detach().cpu().numpy()
            g.create_array(L.head_path(t, key), data=data, compressors=crc, dimension_names=L.HEAD_DIMS.get(data.ndim))
    g.create_array("progress", shape=(cfg.views, nblocks), dtype=np.uint8, chunks=(1, 1), fill_value=0,
                   dimension_names=("view", "block"))
    attrs = dict(ident)
    attrs.update({
        "views": cfg.views, "block_rows": block, "camkd_version": camkd.__version__,
        "teacher_test_accuracy": test_acc,
        "arrays": {"labels": "[N] int64", "aug": "[V, N, 3] int16 (dx, dy, flip)", "logits": "[V, N, K, C]",
                   "features/<layer>/t<k>": "[V, N, c, h, w] per teacher", "heads/t<k>/<param>": "teacher k's classifier head",
                   "progress": "[V, blocks] uint8, 1 = block durable"},
    })
    for t, acc in enumerate(test_acc):
        attrs["teachers"][t]["test_accuracy"] = acc
    g.attrs[L.ATTRS_KEY] = attrs
    return g


def _append_views(g: zarr.Group, views: int) -> None:
    """Grow every per-view array to ``views`` (new views are empty, their progress flags 0)."""
    attrs = g.attrs[L.ATTRS_KEY]
    names = ["aug", "logits", "progress"] + [L.feature_path(n, t) for n, spec in attrs["features"].items()
                                             for t in range(len(spec["shapes"]))]
    for name in names:
        a = g[name]
        a.resize((views,) + a.shape[1:])
    attrs["views"] = views
    g.attrs[L.ATTRS_KEY] = attrs


_PARTIAL = re.compile(r".+\.[0-9a-f]{32}\.partial")


class _BlockWriter(threading.Thread):
    """Writes finished blocks in the background, then flags them done; errors surface in the main thread."""

    def __init__(self, g: zarr.Group, layer_names: list[str], k: int) -> None:
        super().__init__(daemon=True)
        self.g, self.layer_names, self.k = g, layer_names, k
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.written = 0

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            v, b, rows, aug, logits, feats = item
            try:
                self.g["aug"][v, rows] = aug
                self.g["logits"][v, rows] = logits
                for name in self.layer_names:
                    for t in range(self.k):
                        self.g[L.feature_path(name, t)][v, rows] = feats[name][t]
                self.g["progress"][v, b] = 1  # only after every array of the block is written
                self.written += 1
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                self.error = e

    def put(self, item) -> None:
        self.check()
        self.q.put(item)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        self.q.put(None)
        self.join()
        self.check()


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


def _check_teachers(teachers: list[Teacher], train: Dataset) -> None:
    for t in teachers:
        if t.num_classes != train.num_classes:
            raise CamkdError(f"teacher {t.path} has {t.num_classes} classes but {train.name} has {train.num_classes}; "
                             "use teachers trained on this dataset")
        if t.in_channels != train.in_channels:
            raise CamkdError(f"teacher {t.path} takes {t.in_channels}-channel images but {train.name} has {train.in_channels}")


def cache_teachers(cfg: CacheConfig) -> dict:
    """Write (or continue, or extend) the store; returns a summary for the report."""
    if not cfg.teachers:
        raise CamkdError("give at least one --teacher CKPT (or ARCH=CKPT for a reference checkpoint)")
    if cfg.views < 1:
        raise CamkdError("--views must be at least 1")
    if cfg.dtype not in L.DTYPES:
        raise CamkdError(f"unknown --dtype '{cfg.dtype}'; choose float16 or float32")
    device = resolve_device(cfg.device)
    layers = {}
    for text in cfg.features:
        parsed = parse_layer(text)
        if parsed is not None:
            layers[parsed[0]] = parsed[1]
    teachers = [load_teacher(s, device=device) for s in cfg.teachers]
    train = load_split(cfg, "train", device)
    _check_teachers(teachers, train)
    spec = AugSpec(seed=cfg.seed, norm=train.norm)
    shapes = _feature_shapes(teachers, train, layers, device)
    ident = _identity(cfg, teachers, train, spec, layers, shapes)
    path = cfg.out_path(teachers)
    g = _open_or_create(path, ident, cfg, teachers, train, layers, shapes, device)
    return _fill(g, path, cfg, teachers, train, spec, layers, device)


def _open_or_create(path: Path, ident: dict, cfg: CacheConfig, teachers, train, layers, shapes, device) -> zarr.Group:
    if path.exists() and cfg.overwrite:
        if not path.is_dir() or (not (path / "zarr.json").exists() and any(path.iterdir())):
            raise CamkdError(f"{path} exists and is not a Zarr store; refusing to delete it even with --overwrite")
        shutil.rmtree(path)
    if path.exists():
        g = _open_existing(path)
        attrs = g.attrs[L.ATTRS_KEY]
        old = {k: attrs.get(k) for k in ident}
        old["teachers"] = [{k: t.get(k) for k in ("arch", "checkpoint", "sha256", "num_classes")} for t in attrs["teachers"]]
        diff = _differences(old, ident)
        if diff:
            raise CamkdError(f"{path} was made differently: {'; '.join(diff[:3])}; use --overwrite to replace it or another --out")
        for f in path.rglob("*.partial"):  # zarr's temporary files of a write that a kill interrupted
            if _PARTIAL.fullmatch(f.name):
                f.unlink(missing_ok=True)
        if cfg.views > attrs["views"]:
            log(f"extending {path} from {attrs['views']} to {cfg.views} views")
            _append_views(g, cfg.views)
        return g
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CamkdError(f"cannot create {path.parent}: {e.strerror}") from None
    test = load_split(cfg, "test", device)
    test_acc = [evaluate(t.model, test)["top1"] for t in teachers]
    # built under a temporary name and renamed when whole: a run killed while creating leaves no half store
    tmp = path.with_name(f".{path.name}.camkd-creating")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        _create(tmp, ident, cfg, teachers, train, layers, shapes, test_acc)
        tmp.rename(path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CamkdError(f"cannot create {path}: {what}") from None
    return zarr.open_group(str(path), mode="r+")


def _open_existing(path: Path) -> zarr.Group:
    try:
        g = zarr.open_group(str(path), mode="r+")
    except Exception:
        hint = " or add --overwrite" if (path / "zarr.json").exists() else ""  # --overwrite deletes only Zarr stores
        raise CamkdError(f"{path} exists and is not a camkd store; choose another --out{hint}") from None
    attrs = g.attrs.get(L.ATTRS_KEY)
    if not isinstance(attrs, dict) or "format_version" not in attrs:
        raise CamkdError(f"{path} is a Zarr group but not a camkd store; choose another --out or add --overwrite")
    if attrs["format_version"] != L.FORMAT_VERSION:
        raise CamkdError(f"{path} has store format {attrs['format_version']}, this camkd writes {L.FORMAT_VERSION}; use --overwrite")
    return g


def _fill(g: zarr.Group, path: Path, cfg: CacheConfig, teachers, train: Dataset, spec: AugSpec, layers: dict, device) -> dict:
    attrs = g.attrs[L.ATTRS_KEY]
    n, k, block, views = len(train), len(teachers), attrs["block_rows"], attrs["views"]
    np_dtype = L.DTYPES[cfg.dtype]
    t_dtype = torch.float16 if cfg.dtype == "float16" else torch.float32
    done = np.asarray(g["progress"][:])
    todo = [(v, b) for v in range(views) for b in range(done.shape[1]) if not done[v, b]]
    todo_rows = sum(L.block_slice(b, n, block).stop - L.block_slice(b, n, block).start for _, b in todo)
    if done.any() and todo:
        log(f"resuming {path}: {int(done.sum())} of {done.size} blocks already written")
    writer = _BlockWriter(g, list(layers), k)
    writer.start()
    t0 = time.perf_counter()
    try:
        with Bar("caching", todo_rows, enabled=cfg.progress) as bar:
            for v, b in todo:
                rows = L.block_slice(b, n, block)
                m = rows.stop - rows.start
                logits_buf = np.empty((m, k, train.num_classes), dtype=np_dtype)
                aug_buf = np.empty((m, 3), dtype=np.int16)
                feat_buf = {name: [None] * k for name in layers}
                parts: dict[str, list[list[np.ndarray]]] = {name: [[] for _ in range(k)] for name in layers}
                for s in range(0, m, cfg.batch_size):
                    idx = torch.arange(rows.start + s, rows.start + min(s + cfg.batch_size, m))
                    x, params = augment(train.images, idx, spec, view=v)
                    logits, feats = run_teachers(teachers, x, layers)
                    logits_buf[s : s + len(idx)] = logits.to(t_dtype).cpu().numpy()
                    aug_buf[s : s + len(idx)] = params.numpy()
                    for name in layers:
                        for t in range(k):
                            parts[name][t].append(feats[name][t].to(t_dtype).cpu().numpy())
                    bar.update(len(idx), f"view {v + 1}/{views} {bar.rate():.0f} samples/s")
                for name in layers:
                    feat_buf[name] = [np.concatenate(p) for p in parts[name]]
                writer.put((v, b, rows, aug_buf, logits_buf, feat_buf))
        writer.finish()
    except OSError as e:
        writer.error = writer.error or e
        _drain(writer)
        raise _io_error(e, path) from None
    except KeyboardInterrupt:
        _drain(writer)
        raise
    elapsed = time.perf_counter() - t0
    return summarize(g, path, todo_rows, elapsed)


def _drain(writer: _BlockWriter) -> None:
    """Let the writer finish what it holds (finished blocks stay), then stop it."""
    try:
        writer.q.put(None, timeout=60)
        writer.join(timeout=120)
    except queue.Full:
        pass


def _io_error(e: OSError, path: Path) -> CamkdError:
    if e.errno == errno.ENOSPC:
        return CamkdError(f"disk full while writing {path}; finished blocks are kept, free space and rerun the same command to resume")
    return CamkdError(f"cannot write {path}: {e.strerror or e}; finished blocks are kept, rerun the same command to resume")


def summarize(g: zarr.Group, path: Path, rows_done: int, elapsed: float) -> dict:
    """Per-view teacher accuracy from the stored logits, sizes per array."""
    attrs = g.attrs[L.ATTRS_KEY]
    labels = _read(g, path, "labels", slice(None), "")
    acc = []
    for v in range(attrs["views"]):
        logits = _read(g, path, "logits", v, f"view {v} ")
        acc.append([float((logits[:, t].argmax(-1) == labels).mean() * 100) for t in range(logits.shape[1])])
    sizes = array_sizes(path, g)
    n, views = len(labels), attrs["views"]
    return {"path": str(path), "views": views, "n": n, "rows_computed": rows_done, "seconds": elapsed,
            "samples_per_s": rows_done / max(elapsed, 1e-9), "view_accuracy": acc,
            "teachers": [t["arch"] for t in attrs["teachers"]], "store_bytes": _dir_size(path),
            "bytes_per_sample_view": {name: size / (n * views) for name, size in sizes.items()
                                      if name in ("logits", "aug") or name.startswith("features/")}}


def _read(g: zarr.Group, path: Path, name: str, sel, what: str) -> np.ndarray:
    try:
        return np.asarray(g[name][sel])
    except Exception as e:  # a corrupt chunk of a finished block: zarr raises codec / IO errors of several types
        raise CamkdError(f"{path}: array '{name}' {what}cannot be read ({type(e).__name__}: {str(e)[:100]}); "
                         "run 'camkd cache-verify', then rewrite the store with --overwrite") from None


def array_sizes(path: Path, g: zarr.Group) -> dict[str, int]:
    """Bytes on disk of every array (its folder's files)."""
    out = {}
    for name, _ in _walk_arrays(g):
        out[name] = _dir_size(path / name)
    return out


def _walk_arrays(g: zarr.Group, prefix: str = ""):
    for name, node in g.members():
        full = f"{prefix}{name}"
        if isinstance(node, zarr.Group):
            yield from _walk_arrays(node, full + "/")
        else:
            yield full, node


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
