"""`camkd cache-verify`: recompute a random sample of (view, index) pairs and check every chunk decodes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from camkd.device import resolve_device
from camkd.errors import CamkdError
from camkd.store import layout as L
from camkd.store.reader import load_cached_data, open_store
from camkd.store.writer import _walk_arrays
from camkd.teachers import load_teacher, run_teachers
from camkd.views import augment, view_params


@dataclass
class VerifyReport:
    ok: bool
    lines: list[str]


def _tolerance(dtype: str, ref: np.ndarray) -> np.ndarray:
    """The dtype's rounding (half an ulp, relative) plus float32 slack for batch-size dependent kernels."""
    eps = float(np.finfo(L.DTYPES[dtype]).eps)
    return eps * np.abs(ref) + 1e-4 * (1.0 + np.abs(ref))


def _empty_chunk_files(root: Path, name: str, arr) -> list[str]:
    """Missing or zero-length chunk files of a view x sample array.

    zarr reads a missing or empty chunk as fill values, so a deleted or truncated-to-nothing file
    would pass a decode check. The writer stores every chunk (write_empty_chunks), so each
    (view, chunk) of a flagged store must have a non-empty file.
    """
    base = Path(root) / name / "c"
    step = (arr.shards or arr.chunks)[1]
    tail = ("0",) * (arr.ndim - 2)
    out = []
    for v in range(arr.shape[0]):
        for c in range((arr.shape[1] + step - 1) // step):
            f = base.joinpath(str(v), str(c), *tail)
            rows = f"{name} view {v} rows {c * step}:{min((c + 1) * step, arr.shape[1])}"
            if not f.is_file():
                out.append(f"{rows} (chunk file missing)")
            elif f.stat().st_size == 0:
                out.append(f"{rows} (empty chunk file)")
    return out


def cache_verify(path: str | Path, teachers: list[str], *, sample: int = 256, seed: int = 0, data_dir: str | None = None,
                 device: str = "auto") -> VerifyReport:
    store = open_store(path)
    a = store.attrs
    lines, ok = [], True
    # 1. completeness
    missing = store.missing_blocks()
    if missing:
        ok = False
        lines.append(f"INCOMPLETE: {len(missing)} blocks missing (first: view {missing[0][0]} block {missing[0][1]})")
    else:
        lines.append(f"complete: all {store.views} views x {L.num_blocks(store.n, store.block_rows)} blocks")
    # 2. every chunk decodes (crc32c per chunk), read block by block
    bad = []
    for name, arr in _walk_arrays(store.g):
        if arr.ndim >= 2 and arr.metadata.dimension_names and arr.metadata.dimension_names[:2] == ("view", "sample"):
            for v in range(arr.shape[0]):
                for b in range(L.num_blocks(store.n, store.block_rows)):
                    sl = L.block_slice(b, store.n, store.block_rows)
                    try:
                        np.asarray(arr[v, sl])
                    except Exception as e:  # noqa: BLE001
                        bad.append(f"{name} view {v} rows {sl.start}:{sl.stop} ({type(e).__name__})")
            bad += _empty_chunk_files(store.path, name, arr)
        else:
            try:
                np.asarray(arr[...])
            except Exception as e:  # noqa: BLE001
                bad.append(f"{name} ({type(e).__name__})")
    if bad:
        ok = False
        lines.append(f"CORRUPT: {len(bad)} unreadable blocks: " + "; ".join(bad[:5]))
    else:
        lines.append("every chunk decodes")
    if bad or missing:
        return VerifyReport(ok, lines)
    # 3. recompute a sample
    dev = resolve_device(device)
    loaded = [load_teacher(s, device=dev) for s in teachers]
    shas = [t["sha256"] for t in a["teachers"]]
    if [t.sha256 for t in loaded] != shas:
        raise CamkdError(f"the --teacher checkpoints differ from the store's (sha256 {[s[:12] for s in shas]}); "
                         "pass the same checkpoints in the same order")
    train, _, spec = load_cached_data(store, data_dir=data_dir)
    train = train.to(dev)
    rng = np.random.default_rng(seed)
    pairs = sorted({(int(rng.integers(store.views)), int(rng.integers(store.n))) for _ in range(sample)})
    layers = {name: spec_["index"] for name, spec_ in a["features"].items()}
    worst: dict[str, float] = {}
    for v in sorted({p[0] for p in pairs}):
        idx = np.array([i for vv, i in pairs if vv == v], dtype=np.int64)
        stored_aug = np.asarray(store.g["aug"].oindex[v, idx])
        if not np.array_equal(stored_aug, view_params(spec, v, idx).numpy()):
            ok = False
            lines.append(f"MISMATCH: augmentation parameters of view {v} differ from the seeded replay")
        x, _ = augment(train.images, torch.from_numpy(idx), spec, view=v)
        logits, feats = run_teachers(loaded, x, layers)
        checks = {"logits": (logits.float().cpu().numpy(), np.asarray(store.g["logits"].oindex[v, idx]).astype(np.float32))}
        for name in layers:
            for t in range(len(loaded)):
                checks[L.feature_path(name, t)] = (feats[name][t].float().cpu().numpy(),
                                                   np.asarray(store.g[L.feature_path(name, t)].oindex[v, idx]).astype(np.float32))
        for name, (ref, got) in checks.items():
            diff = np.abs(ref - got)
            worst[name] = max(worst.get(name, 0.0), float(diff.max()))
            if (diff > _tolerance(a["dtype"], ref)).any():
                ok = False
                lines.append(f"MISMATCH: {name} view {v} differs by up to {float(diff.max()):.3g} (beyond {a['dtype']} resolution)")
    for name, w in worst.items():
        lines.append(f"{name}: largest difference {w:.3g} over {len(pairs)} (view, index) pairs")
    lines.append("OK" if ok else "FAILED")
    return VerifyReport(ok, lines)
