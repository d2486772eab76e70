"""`camkd cache-verify`: completeness, every written chunk's checksum, and a recomputed random sample.

Blocks whose progress flag is not set are unfinished work (the same cache-teachers command
writes them), never corruption; only flagged blocks are checked. ``repair`` clears the flags
of the corrupt blocks and deletes their damaged objects, so that the same cache-teachers
command recomputes exactly those blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr

import camkd.store.layout as layout
import camkd.store.topk as topk
from camkd.data.decode import decoder_versions
from camkd.data.norm import normalize
from camkd.errors import CamkdError
from camkd.store.description import TeacherRecord, tf32_of
from camkd.store.location import Location, listed_sizes
from camkd.store.reader import TeacherStore, load_cached_data, open_store
from camkd.store.runner import TeacherRunner
from camkd.store.sizes import is_view_array, walk_arrays
from camkd.store.viewcheck import first_differing_row, pixels_differ_why
from camkd.words import plural

RERUN = "rerun the same cache-teachers command"
SAMPLE = 256  # (view, index) pairs a check with teachers recomputes, unless told (cache-verify --sample)


@dataclass
class VerifyReport:
    ok: bool
    lines: list[str]
    corrupt_blocks: list[tuple[int, int]] = field(default_factory=list)  # (view, block), repaired or not
    repaired: bool = False


@dataclass
class _Damage:
    array: str
    view: int | None  # None: an array outside the view x block grid (labels, heads)
    block: int | None
    rows: str
    reason: str
    keys: list[str] = field(default_factory=list)  # stored objects to delete on repair

    def __str__(self) -> str:
        where = f" view {self.view} rows {self.rows}" if self.view is not None else ""
        return f"{self.array}{where} ({self.reason})"


SLACK = 1e-4  # float32 slack, relative to 1 + |value|, for batch-size dependent kernels
# TF32 keeps 10 of float32's 23 mantissa bits (rounding 2^-11 relative per product); a network's outputs then differ
# with the batch size and the kernels cuDNN picks (cudnn.benchmark) by about 1e-3: a few units of 2^-10
TF32_RTOL = 4 * 2.0**-10


def _tolerance(dtype: str, ref: np.ndarray, scale: np.ndarray | None = None, *, made_tf32: bool = False,
               here_tf32: bool = False) -> np.ndarray:
    """The dtype's rounding (its machine epsilon x |value|; int8: half the quantization step, scale / 2 per element)
    plus float32 slack for batch-size dependent kernels; when the store's teachers (``made_tf32``, recorded) or this
    machine (``here_tf32``) ran float32 in TF32, TF32's rounding too: TF32_RTOL x (|value| + its sample's mean |value|),
    the mean because a value near zero is a sum of larger terms, each rounded to TF32 (an error at their scale)."""
    slack = SLACK * (1.0 + np.abs(ref))
    if made_tf32 or here_tf32:
        magnitude = np.abs(ref)
        slack = slack + TF32_RTOL * (magnitude + magnitude.mean(axis=tuple(range(1, ref.ndim)), keepdims=True))
    if dtype == "int8":
        return scale[..., None, None] / 2 + slack
    eps = float(np.finfo(layout.DTYPES[dtype]).eps)
    return eps * np.abs(ref) + slack


def _tolerance_text(dtype: str, tf32: bool = False) -> str:
    """The rule of _tolerance in words, x the recomputed value (what the printed differences were held to)."""
    rounding = "scale/2" if dtype == "int8" else f"{float(np.finfo(layout.DTYPES[dtype]).eps):.3g}|x|"
    tf32_text = f" + {TF32_RTOL:.3g}(|x| + mean |x| of its sample) (TF32)" if tf32 else ""
    return f"{rounding} + {SLACK:g}(1 + |x|){tf32_text} ({dtype})"


def _tf32_line(made: bool, here: bool) -> str:
    """Why the tolerance holds TF32's rounding: which side ran float32 in TF32."""
    sides = [w for w, on in (("the store's teachers ran", made), ("this machine runs", here)) if on]
    return f"TF32: {' and '.join(sides)} float32 convolutions or matmuls in TF32 (10 mantissa bits); the tolerance holds it"


def _flags(store: TeacherStore) -> tuple[np.ndarray, list[_Damage]]:
    """Progress flags; a flag chunk that does not decode counts as unset (and as damage to delete on repair)."""
    arr = store.g[layout.PROGRESS]
    try:
        return np.asarray(arr[...]) != 0, []
    except Exception:  # noqa: BLE001 - read flag by flag to find the bad ones
        pass
    flags = np.zeros(arr.shape, dtype=bool)
    bad = []
    for v in range(arr.shape[0]):
        for b in range(arr.shape[1]):
            try:
                flags[v, b] = bool(arr[v, b])
            except Exception as e:  # noqa: BLE001
                bad.append(_Damage(layout.PROGRESS, v, b, f"block {b}", f"flag {layout.read_failure(e)}",
                                   [layout.object_key(arr, (v, b))]))
    return flags, bad


def _check_block(name: str, arr: zarr.Array, v: int, b: int, rows: slice, listed: dict[str, int] | None = None) -> _Damage | None:
    """One flagged block of a view x sample array: its objects exist, are non-empty, and decode.

    zarr reads a missing or empty object as fill values, so a deleted or truncated-to-nothing file
    would pass a decode check; the writer stores every chunk (write_empty_chunks), so every object of
    a flagged block must be there. ``listed``: object sizes from one listing of a remote store (else a stat each).
    """
    keys = layout.block_object_keys(arr, v, rows)
    span = f"{rows.start}:{rows.stop}"
    for key in keys:
        size = layout.object_size(arr, key) if listed is None else listed.get(key)
        if size is None:
            return _Damage(name, v, b, span, "chunk file missing", keys)
        if size == 0:
            return _Damage(name, v, b, span, "empty chunk file", keys)
    try:
        np.asarray(arr[v, rows])
    except Exception as e:  # noqa: BLE001 - zarr raises codec / IO errors of several types
        return _Damage(name, v, b, span, f"a chunk {layout.read_failure(e)}", keys)
    return None


def _scan(store: TeacherStore, flags: np.ndarray) -> list[_Damage]:
    nb = flags.shape[1]
    listed = listed_sizes(store.g)  # None for a local store
    bad = []
    for name, arr in walk_arrays(store.g):
        if name == layout.PROGRESS:
            continue
        if is_view_array(arr):
            for v in range(arr.shape[0]):
                for b in range(nb):
                    if flags[v, b]:
                        damage = _check_block(name, arr, v, b, layout.block_slice(b, store.n, store.block_rows), listed)
                        if damage:
                            bad.append(damage)
        else:
            try:
                np.asarray(arr[...])
            except Exception as e:  # noqa: BLE001
                bad.append(_Damage(name, None, None, "", f"a chunk {layout.read_failure(e)}"))
    return bad


def _repair(path: Location, bad: list[_Damage]) -> None:
    """Delete the damaged objects and clear the flags of their blocks (objects first: a crash in between
    leaves a flagged block with a missing object, which the next verify reports again)."""
    g = path.open_group("r+")
    for d in bad:
        arr = g[d.array]
        for key in d.keys:
            if layout.object_size(arr, key) is not None:
                layout.delete_object(arr, key)
    prog = g[layout.PROGRESS]
    for v, b in sorted({(d.view, d.block) for d in bad}):
        prog[v, b] = 0


def verify_store(path: str | Path, teachers: Callable[[], TeacherRunner] | None = None, *, sample: int = SAMPLE, seed: int = 0,
                 data_dir: str | None = None, repair: bool = False) -> VerifyReport:
    """Check a store; with ``teachers`` (called once the checksums pass: it loads them) also recompute ``sample``
    random (view, index) pairs of flagged blocks."""
    store = open_store(path)
    lines: list[str] = []
    # 1. completeness: unflagged blocks are work still to do, not damage
    flags, bad = _flags(store)
    unflagged = [(int(v), int(b)) for v, b in zip(*np.nonzero(~flags))]
    if unflagged:
        v, b = unflagged[0]
        lines.append(f"INCOMPLETE: {plural(len(unflagged), 'block')} missing (first: view {v} block {b}); "
                     "not written yet, which is not damage")
    else:
        lines.append(f"complete: all {plural(store.views, 'view')} x {plural(flags.shape[1], 'block')}")
    # 2. every object of every flagged block exists and passes its checksum
    bad += _scan(store, flags)
    whole = [d for d in bad if d.view is None]  # written once at creation: no block to recompute
    blocks = sorted({(d.view, d.block) for d in bad if d.view is not None})
    if bad:
        lines.append(f"CORRUPT: {plural(len(bad), 'unreadable block')}: " + "; ".join(str(d) for d in bad[:5])
                     + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""))
    else:
        lines.append("every written chunk passes its checksum")
    report = VerifyReport(ok=not bad and not unflagged, lines=lines, corrupt_blocks=blocks)
    if whole:
        lines.append(f"verdict: CORRUPT — {', '.join(d.array for d in whole)} cannot be recomputed block by block; "
                     "rewrite the store with cache-teachers --overwrite")
        return report
    if bad:
        if repair:
            _repair(store.location, [d for d in bad if d.view is not None])
            report.repaired = True
            lines.append(f"repaired: cleared the progress flags of {plural(len(blocks), 'block')} and deleted their damaged "
                         "chunks")
            lines.append(f"verdict: REPAIRED — {RERUN} to recompute {'that block' if len(blocks) == 1 else f'those {len(blocks)} blocks'}")
        else:
            lines.append(f"verdict: CORRUPT — {plural(len(blocks), 'written block')} {'is' if len(blocks) == 1 else 'are'} "
                         f"damaged; run 'camkd cache-verify {store.path} "
                         f"--repair', then {RERUN} to recompute only them (no need to delete the store)")
        return report
    # 3. recompute a sample of the written blocks
    if not teachers:
        lines.append("recomputation skipped: it needs the teachers (-t CKPT for each, in the store's order)")
    elif flags.any():
        mismatch = _recompute(store, teachers(), flags, lines, sample=sample, seed=seed, data_dir=data_dir)
        if mismatch:
            report.ok = False
            lines.append("verdict: FAILED — stored outputs differ from what the teachers compute; rewrite the store with "
                         "cache-teachers --overwrite")
            return report
    if unflagged:
        lines.append(f"verdict: INCOMPLETE — {RERUN} to finish")
    else:
        lines.append("verdict: OK")
    return report


def _topk_checks(store: TeacherStore, v: int, idx: np.ndarray, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """(recomputed, stored, dtype, None) per top-k array: the stored logits against the recomputed logits of the
    stored classes (a damaged index shows), the kept values against the recomputed top k, the float32 scalars."""
    got = {name: np.asarray(store.g[layout.topk_path(name)].oindex[v, idx]) for name in layout.TOPK}
    dtype = store.description.dtype
    ref = {name: t.numpy() for name, t in topk.compute(logits, labels, store.logits_spec, dtype).items()}
    index = torch.from_numpy(got["index"].astype(np.int64)).clamp(0, logits.shape[-1] - 1)
    values = layout.topk_path("values")
    # the index through the logits it points at (a damaged class index shows), the values against the recomputed top k
    checks = {f"{layout.topk_path('index')} (the recomputed logits of the stored classes)":
              (logits.gather(-1, index).numpy(), got["values"].astype(np.float32), dtype, None),
              values: (ref["values"], got["values"].astype(np.float32), dtype, None)}
    for name in ("lse", "log_tail", "ce", "log_entropy"):
        checks[layout.topk_path(name)] = (ref[name], got[name].astype(np.float32), "float32", None)
    return checks


def _check_same_teachers(stored: tuple[TeacherRecord, ...], given: list[dict]) -> None:
    """The -t checkpoints are the store's, in its order: else one line saying how many it has and which differs."""
    if len(given) != len(stored):
        raise CamkdError(f"the store has {plural(len(stored), 'teacher')} ({', '.join(t.arch for t in stored)}), "
                         f"{len(given)} given with -t; pass all of them, in the store's order")
    for k, (s, g) in enumerate(zip(stored, given)):
        if s.sha256 != g["sha256"]:
            raise CamkdError(f"-t number {k + 1} ({g.get('path', g['arch'])}, sha256 {g['sha256'][:12]}) is not the store's "
                             f"teacher {k + 1} ({s.arch}, {s.checkpoint or ''} sha256 {s.sha256[:12]}); pass the "
                             "store's checkpoints in its order")


def _sample_pairs(store: TeacherStore, flags: np.ndarray, sample: int, seed: int) -> list[tuple[int, int]]:
    """``sample`` distinct (view, index) pairs of the flagged blocks, drawn uniformly (all of them if there are fewer)."""
    views, blocks = np.nonzero(flags)
    starts = np.array([layout.block_slice(int(b), store.n, store.block_rows).start for b in blocks], dtype=np.int64)
    stops = np.array([layout.block_slice(int(b), store.n, store.block_rows).stop for b in blocks], dtype=np.int64)
    ends = np.cumsum(stops - starts)  # flat index space: the flagged blocks' rows one after another
    total = int(ends[-1]) if len(ends) else 0
    picks = np.random.default_rng(seed).choice(total, size=min(sample, total), replace=False)
    j = np.searchsorted(ends, picks, side="right")
    rows = starts[j] + picks - (ends[j] - (stops[j] - starts[j]))
    return sorted(zip(views[j].tolist(), rows.tolist()))


def _recompute(store: TeacherStore, teachers: TeacherRunner, flags: np.ndarray, lines: list[str], *, sample: int, seed: int,
               data_dir: str | None) -> bool:
    """Recompute random (view, index) pairs of flagged blocks; appends findings to ``lines``, returns True on a mismatch."""
    d = store.description
    _check_same_teachers(d.teachers, teachers.provenance)
    tf32 = {"made_tf32": d.tf32, "here_tf32": any(tf32_of(teachers.device).values())}  # the store's record; this machine
    if any(tf32.values()):
        lines.append(_tf32_line(tf32["made_tf32"], tf32["here_tf32"]))
    # an image folder's sample is decoded in this process (a few hundred files: no worker processes to start)
    workers = 0 if d.keeps_pixels else None
    train, _, spec = load_cached_data(store, data_dir=data_dir, workers=workers)
    train = train.to(teachers.device)
    pairs = _sample_pairs(store, flags, sample, seed)
    layers = d.layer_indices()
    worst: dict[str, tuple[float, str]] = {}
    mismatch = False
    for v in sorted({p[0] for p in pairs}):
        idx = np.array([i for vv, i in pairs if vv == v], dtype=np.int64)
        stored_aug = np.asarray(store.g[layout.AUG].oindex[v, idx])
        images, params, hashes = next(train.view_batches(spec, v, [idx], teachers.device))
        row = first_differing_row(stored_aug, params.numpy())  # the view check distillation runs (viewcheck)
        if row is not None:
            mismatch = True
            lines.append(f"MISMATCH: augmentation parameters of view {v} differ from the seeded replay (first: "
                         f"{train.sample_name(int(idx[row]))})")
        if hashes is not None:  # an image-folder store: the views decoded here against the pixels the teachers saw
            row = first_differing_row(np.asarray(store.g[layout.PIXELS].oindex[v, idx]), hashes)
            if row is not None:
                mismatch = True
                lines.append(f"MISMATCH: pixels of view {v} differ from the ones the teachers saw (first: "
                             f"{train.sample_name(int(idx[row]))}); {pixels_differ_why(d.folder.decoder_versions, decoder_versions())}")
            else:
                lines.append(f"pixels of view {v}: {len(idx)} views decoded from the files match the stored CRC-32s")
        logits, feats = teachers.run(normalize(images, spec.norm), layers)
        if store.logits_spec.kind == "dense":
            checks = {layout.LOGITS: (logits.float().cpu().numpy(),
                                      np.asarray(store.g[layout.LOGITS].oindex[v, idx]).astype(np.float32), d.dtype, None)}
        else:
            checks = _topk_checks(store, v, idx, logits.float().cpu(), train.labels[torch.from_numpy(idx).to(train.labels.device)].cpu())
        fdtype = store.feature_dtype
        for name in layers:
            for t in range(store.num_teachers):
                got = np.asarray(store.g[layout.feature_path(name, t)].oindex[v, idx]).astype(np.float32)
                scale = None
                if fdtype == "int8":
                    scale = np.asarray(store.g[layout.scale_path(name, t)].oindex[v, idx]).astype(np.float32)
                    got = layout.dequantize(got, scale)
                checks[layout.feature_path(name, t)] = (feats[name][t].float().cpu().numpy(), got, fdtype, scale)
        for name, (ref, got, dtype, scale) in checks.items():
            diff = np.abs(ref - got)
            worst[name] = (max(worst.get(name, (0.0, ""))[0], float(diff.max())), dtype)
            if (diff > _tolerance(dtype, ref, scale, **tf32)).any():
                mismatch = True
                lines.append(f"MISMATCH: {name} view {v} differs by up to {float(diff.max()):.3g} (beyond {dtype} resolution)")
    for name, (w, dtype) in worst.items():
        lines.append(f"{name}: largest difference {w:.3g} over {len(pairs)} (view, index) pairs; tolerance per value x: "
                     f"{_tolerance_text(dtype, any(tf32.values()))}")
    return mismatch
