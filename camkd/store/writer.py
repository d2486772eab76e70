"""Writing a store: the steps of `camkd cache-teachers` once the teachers and the data are loaded.

The caller (camkd.cache) loads the teachers and hands them in as a :class:`TeacherRunner`; this module
decides what to do with --out (identity.py), prints the planned size (space.py), creates or opens the
store (schema.py, identity.py), fills its unfinished blocks (pipeline.py) and summarizes it (summary.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

import camkd.store.layout as layout
import camkd.store.topk as topk
from camkd import dist
from camkd.data import DataSplit
from camkd.data.augspec import AugSpec
from camkd.progress import log
from camkd.store.config import CacheConfig
from camkd.store.description import read_description
from camkd.store.identity import Target, check_target, identity, open_or_create, remove_partial_files
from camkd.store.location import Location
from camkd.store.pipeline import compute_blocks
from camkd.store.plan import block_rows_for, plan_store
from camkd.store.runner import TeacherRunner
from camkd.store.schema import sample_arrays
from camkd.store.space import check_space
from camkd.store.summary import record_tail_mass, summarize
from camkd.words import plural


def write_store(cfg: CacheConfig, teachers: TeacherRunner, train: DataSplit, layers: dict[str, int], shapes: dict,
                batch: int, world: dist.World, test_accuracy: Callable[[], list[float] | None]) -> dict:
    """Write (or continue, or extend) the store; returns a summary for the report.

    ``test_accuracy``: each teacher's test top-1 (None: not evaluated), called only when a store is created.
    Under torchrun, rank 0 alone creates or extends the store's metadata; every rank then computes
    its share of the unfinished (view, block) units, each written whole by one rank with its own
    progress flag, so the store is byte-identical for any number of ranks and resumes under another.
    """
    lspec = topk.parse_logits(cfg.logits, cfg.kd_T, train.num_classes)
    spec = train.aug_spec(cfg.aug_seed)
    made = identity(cfg, teachers, train, spec, layers, shapes, lspec)
    path = cfg.out_path([t["arch"] for t in teachers.provenance])
    # decided (and refused, before any output) by every rank before rank 0 changes anything
    target = check_target(path, made, cfg)
    samples = {layout.LABELS: train.labels.cpu().numpy(),
               **{layout.files_path(name): a for name, a in train.store_arrays().items()}}
    aug = made.aug_layout
    block, views, done = _block_rows(cfg, teachers.num_teachers, train, shapes, batch, lspec, aug), cfg.views, None
    if target is Target.CONTINUE:
        block, stored_views, done = _stored(path)
        views = max(views, stored_views)
        if done.all() and cfg.views <= stored_views and not cfg.dry_run:
            if world.main:
                remove_partial_files(path)
            return _complete(path, cfg, stored_views, len(train))
        if cfg.views < stored_views and world.main:
            log(f"{path} has {plural(stored_views, 'view')}; -V {cfg.views} below that changes nothing")
    plan = plan_store(n=len(train), views=views, k=teachers.num_teachers, num_classes=train.num_classes, dtype=cfg.dtype,
                      shapes=shapes, block_rows=block, feature_dtype=cfg.stored_feature_dtype, compressor=cfg.compressor,
                      logits=lspec, aug=aug, samples=sample_arrays(samples),
                      heads=teachers.heads)
    lines = check_space(cfg, path, plan, done, shapes)
    if cfg.dry_run:
        return {"dry_run": True, "path": str(path), "plan": lines}
    if world.main and cfg.progress:
        for line in lines:
            log(line)
    test_acc = test_accuracy() if target is not Target.CONTINUE else None
    with dist.agree("creating or opening the store"):
        if world.main:
            open_or_create(path, target, made, cfg, teachers, samples, shapes, test_acc, block)
    return _fill(path, cfg, teachers, train, spec, shapes, batch, world)


def _stored(path: Location) -> tuple[int, int, np.ndarray]:
    """A continued store's rows per block, views and progress flags [views, blocks] (bool)."""
    g = path.open_group("r")
    stored = read_description(g)
    return stored.block_rows, stored.views, np.asarray(g[layout.PROGRESS][:]).astype(bool)


def _complete(path: Location, cfg: CacheConfig, views: int, n: int) -> dict:
    """A store that already holds every asked view: one line, nothing computed (no plan, no teacher evaluation)."""
    below = f"; -V {cfg.views} is below its {plural(views, 'view')} and changes nothing" if cfg.views < views else ""
    line = (f"{path} is complete ({plural(views, 'view')} x {plural(n, 'sample')}): nothing to compute{below} "
            "(a larger -V adds views)")
    return {"complete": True, "path": str(path), "plan": [line], "message": line}


def _block_rows(cfg: CacheConfig, k: int, train: DataSplit, shapes: dict, batch: int, logits: topk.LogitsSpec,
                aug: layout.AugLayout) -> int:
    """Rows per writer unit of a new store with these options."""
    fdtype = cfg.stored_feature_dtype
    return block_rows_for(k, train.num_classes, np.dtype(layout.DTYPES[cfg.dtype]).itemsize, shapes, batch, len(train),
                          feature_itemsize=np.dtype(layout.FEATURE_DTYPES[fdtype]).itemsize, scales=fdtype == "int8",
                          logits=logits, aug=aug)


def _fill(path: Location, cfg: CacheConfig, teachers: TeacherRunner, train: DataSplit, spec: AugSpec, shapes: dict,
          batch: int, world: dist.World) -> dict:
    """This rank's share of the unfinished blocks (unit i goes to rank i mod W: one writer per unit), then the summary."""
    g = path.open_group("r+")
    stored = read_description(g)
    n, block = len(train), stored.block_rows
    done = np.asarray(g[layout.PROGRESS][:])
    todo = [(v, b) for v in range(stored.views) for b in range(done.shape[1]) if not done[v, b]]
    mine = todo[world.rank :: world.size]
    rows = sum(layout.block_slice(b, n, block).stop - layout.block_slice(b, n, block).start for _, b in mine)
    if done.any() and todo and world.main:
        log(f"resuming {path}: {int(done.sum())} of {done.size} blocks already written")
    t0 = time.perf_counter()
    with dist.agree("writing the store"):
        if mine:
            compute_blocks(g, stored, path, teachers, train, spec, shapes, batch, mine, rows, progress=cfg.progress and world.main)
    elapsed = time.perf_counter() - t0
    rows_all = int(dist.all_sum(torch.tensor([rows], dtype=torch.int64, device=train.labels.device)).item())
    if not world.main:
        return {"path": str(path), "rows_computed": rows, "seconds": elapsed}
    return summarize(record_tail_mass(g, path), path, rows_all, elapsed)
