"""Where teacher outputs come from during training, behind one small protocol.

* :class:`NoTeachers`: teacher training and the student alone (``ce``, the speed limit);
* :class:`StoreTeachers`: a store made by ``cache-teachers`` (no teacher runs);
* :class:`LiveTeachers`: the teachers re-run on every batch (``--online``, the reference's way).

Each source decides its own streaming (``window_blocks``: None when everything it serves is in
memory), serves the batches of an epoch's plan (:class:`camkd.epoch_plan.EpochPlan`, which the data's
views are cut from too), and turns a batch into a :class:`TeacherOut`.
The training loop (fit.py) has no mode branches: it asks the source.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from camkd import dist
from camkd.data.decode import decoder_versions
from camkd.data.views import to_device
from camkd.epoch_plan import EpochPlan
from camkd.errors import CamkdError
from camkd.methods import TeacherOut
from camkd.precision import Precision
from camkd.store import topk
from camkd.store.reader import BufferPool, FeatureStream, Rows, TeacherStore
from camkd.store.viewcheck import first_differing_row, pixels_differ_why
from camkd.teachers import Teacher, prepare, run_teachers, stored_heads

Streamed = dict[str, list[Any]]  # per layer, per teacher: numpy arrays, or Rows (FeatureStream on a device)


class TeacherSource(Protocol):
    num_teachers: int
    block_rows: int  # rows of one streamed block (1: no blocks)
    window_blocks: int | None  # blocks per shuffle window, None: the order is one full permutation

    def batches(self, plan: EpochPlan) -> Iterator[Any]:
        """The opaque per-batch data of each of ``plan``'s batches, in order (begins ``plan.view`` when called)."""

    def check_view(self, view: int, idx: np.ndarray, params: torch.Tensor, hashes: np.ndarray | None) -> None:
        """Called on every batch with the augmentation parameters the loop replayed and its views' CRC-32s (image
        folders; None for in-memory data): a source that read the teachers' outputs checks they are of these views."""

    def teacher_outputs(self, idx: torch.Tensor, x: torch.Tensor, data: Any) -> TeacherOut:
        """The teachers' outputs for the batch (indices on the device, augmented images)."""


def plan_rows(plan: EpochPlan, windows: Iterator[tuple[np.ndarray, Streamed]]) -> Iterator[Streamed]:
    """Each of ``plan``'s batches' rows of per-row data streamed in the plan's windows (features per layer per
    teacher: numpy arrays, or :class:`Rows` the step gathers), cut at the plan's positions (``plan.starts``): the epoch is batched once, by
    the plan. A batch inside one window is a slice of it (no copy); only a batch across windows is concatenated."""
    held: list[tuple[int, Streamed]] = []  # (where each window begins in the epoch's order, its data), in order
    end = 0
    for start, rows in zip(plan.starts, plan.batches):
        stop = start + len(rows)
        while end < stop:
            got, feats = next(windows)
            held.append((end, feats))
            end += len(got)
        while len(held) > 1 and held[1][0] <= start:  # windows before this batch are never needed again
            held.pop(0)
        parts = [(at, feats) for at, feats in held if at < stop]
        if len(parts) == 1:
            at, feats = parts[0]
            yield {name: [a[start - at : stop - at] for a in per] for name, per in feats.items()}
            continue
        nxt = [at for at, _ in parts[1:]] + [stop]
        yield {name: [_cat([feats[name][t][max(start - at, 0) : min(stop, e) - at] for (at, feats), e in zip(parts, nxt)])
                      for t in range(len(per))] for name, per in parts[0][1].items()}


def _cat(pieces: list) -> Any:
    return Rows.cat(pieces) if isinstance(pieces[0], Rows) else np.concatenate(pieces)


def _in_memory(plan: EpochPlan) -> Iterator[Streamed]:
    """No per-batch data: everything the source serves is in memory (or computed at the step)."""
    return ({} for _ in plan.batches)


def streamed_window(store: TeacherStore, layers: tuple[str, ...], memory_budget_mb: float, window_blocks: int) -> int | None:
    """The one rule for streaming: a view's features stream in windows of ``window_blocks`` blocks when they
    exceed the memory budget, else they are held whole (None). Live teachers replaying a store follow it too."""
    fits = store.feature_bytes_per_view(layers) <= memory_budget_mb * 2**20
    return None if (not layers or fits) else window_blocks


class NoTeachers:
    """No teacher outputs: teacher training, and the student trained alone with ``ce``."""

    num_teachers, block_rows, window_blocks = 0, 1, None

    def batches(self, plan):
        return _in_memory(plan)

    def check_view(self, view, idx, params, hashes) -> None:
        """Nothing to check: the images are augmented here and now, not read from a store."""

    def teacher_outputs(self, idx, x, data) -> TeacherOut:
        return TeacherOut(logits=x.new_zeros((x.shape[0], 0, 0)))


class StoreTeachers:
    """Teacher outputs read from a store: a view's logits on the device in one read, its features
    whole when they fit ``memory_budget_mb``, otherwise streamed in windows of contiguous blocks.

    A remote store (s3://, gs://, ...) is read through a local copy of the view being trained
    (stage.py): beginning view v waits for v to be staged, then starts staging (v + 1) mod V in the
    background (the next epoch's view) and drops the others, so at most two views are on local disk
    (under ``stage_dir``, a temporary folder by default, deleted at the end). A local store is read directly.
    Under torchrun with several ranks on a machine (LOCAL_WORLD_SIZE > 1), local rank 0 stages and the
    other local ranks read its copy: every rank agrees that view v is staged before any reads it, and
    local rank 0 drops a view only after that agreement at the start of the next one.
    """

    def __init__(self, store: TeacherStore, layers: tuple[str, ...], device: torch.device, *, memory_budget_mb: float,
                 window_blocks: int = 4, stage_dir: str | None = None, temperature: float | None = None,
                 sample_name: Callable[[int], str] = "sample {}".format) -> None:
        """``temperature``: the run's kd_T; a top-k store must have cached it (its logits are rebuilt at it).
        None for a method that reads no teacher logits (``ce``): a top-k store's logits are then not read at all.
        ``sample_name``: sample i in a message (the training split's sample_name)."""
        self.store, self.layers, self.device, self.sample_name = store, layers, device, sample_name
        self.is_topk = store.logits_spec.kind == "topk"
        self.no_logits = self.is_topk and temperature is None
        if self.is_topk and not self.no_logits:
            topk.temperature_index(store.logits_spec, temperature, str(store.path))
        self.temperature = temperature
        self.num_teachers, self.block_rows = store.num_teachers, store.block_rows
        self.stager = None
        self.shared_stage: Path | None = None  # the folder of local rank 0's copy, on the other local ranks
        self.stage_agree = False  # agree over ranks that a view is staged before reading it
        if not store.location.is_local:
            from camkd.store.stage import ViewStager, node_stage_name

            world = dist.current()
            if world.active and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
                name, self.stage_agree = node_stage_name(store), True
                if world.local_rank == 0:
                    self.stager = ViewStager(store, stage_dir, layers, name=name)
                else:
                    self.shared_stage = Path(stage_dir if stage_dir is not None else tempfile.gettempdir()) / name
            else:
                self.stager = ViewStager(store, stage_dir, layers)
        self._shared_src: TeacherStore | None = None
        self.heads = stored_heads(store, device)
        self.window_blocks = streamed_window(store, layers, memory_budget_mb, window_blocks)
        self._view = -1
        self._src: TeacherStore = store  # where the current view is read from (the store, or its staged copy)
        self._logits: torch.Tensor | None = None
        self._topk: dict[str, torch.Tensor] = {}
        self._feats: dict[str, list[torch.Tensor]] = {}
        self._aug: np.ndarray | None = None  # the current view's stored augmentation and pixel hashes, on the host
        self._pixels: np.ndarray | None = None
        self._buffers = BufferPool()  # the streamed windows' host buffers, reused epoch after epoch

    def prefetch(self, view: int) -> None:
        """Start staging ``view`` of a remote store in the background (nothing for a local store)."""
        if self.stager is not None:
            self.stager.start(view % self.store.views)

    @property
    def staged_bytes(self) -> int:
        """Bytes this process copied from the remote store (0 for a local store, and on local ranks > 0)."""
        return self.stager.bytes_copied if self.stager is not None else 0

    def _view_source(self, view: int) -> TeacherStore:
        if self.stager is None and self.shared_stage is None:
            return self.store
        with dist.agree(f"staging view {view} of {self.store.path}") if self.stage_agree else contextlib.nullcontext():
            src = self.stager.store(view) if self.stager is not None else None
        if self.stager is None:  # local rank 0 has staged it (agreed above)
            from camkd.store.stage import open_staged

            if self._shared_src is None:
                self._shared_src = open_staged(self.shared_stage, self.store)
            return self._shared_src
        nxt = (view + 1) % self.store.views
        self.stager.evict(keep={view, nxt})  # after the agreement: no local rank reads an older view any more
        self.stager.start(nxt)
        return src

    def _begin_view(self, view: int) -> None:
        if view == self._view:
            return
        self._src = self._view_source(view)
        self._aug, self._pixels = self._src.aug(view), self._src.pixels(view)
        if self.no_logits:
            self._topk = {}
        elif self.is_topk:
            self._topk = self._src.topk(view, self.temperature, self.device)
        else:
            self._logits = self._src.logits(view, self.device)
        self._feats = {}
        if self.window_blocks is None:
            for layer in self.layers:
                self._feats[layer] = [to_device(torch.from_numpy(a), self.device) for a in self._src.features(layer, view)]
        self._view = view

    def batches(self, plan):
        self._begin_view(plan.view)
        if self.window_blocks is None:
            return _in_memory(plan)
        return plan_rows(plan, iter(FeatureStream(self._src, self.layers, plan.view, list(plan.windows), device=self.device,
                                                  buffers=self._buffers)))

    def close(self) -> None:
        """Delete the staged copies of a remote store (also done at garbage collection and at exit)."""
        if self.stager is not None:
            self.stager.close()

    def check_view(self, view: int, idx: np.ndarray, params: torch.Tensor, hashes: np.ndarray | None) -> None:
        """The batch's replayed parameters equal the stored ones, and its views' CRC-32s the stored ones (on the host):
        :mod:`camkd.store.viewcheck`, the check cache-verify runs too."""
        row = first_differing_row(self._aug[idx], params.numpy())
        if row is not None:
            raise CamkdError(f"{self.store.path}: the stored augmentation of view {view} differs from its seeded replay "
                             f"(first: {self.sample_name(int(idx[row]))}); the store was made by an incompatible camkd; re-cache")
        row = None if self._pixels is None else first_differing_row(self._pixels[idx], hashes)
        if row is not None:
            why = pixels_differ_why(self.store.description.folder.decoder_versions, decoder_versions())
            raise CamkdError(f"{self.store.path}: the pixels of {self.sample_name(int(idx[row]))} in view {view} differ from "
                             f"the ones the teachers saw; {why}")

    def teacher_outputs(self, idx: torch.Tensor, x: torch.Tensor, data: Streamed) -> TeacherOut:
        if self.window_blocks is None:
            feats = {layer: [f[idx].float() for f in per] for layer, per in self._feats.items()}
        else:
            # the window's rows on the device, gathered here as a whole view's are (FeatureStream's Rows)
            feats = {layer: [a.gather().float() for a in per] for layer, per in data.items()}
        if self.no_logits:
            return TeacherOut(logits=x.new_zeros((len(idx), self.num_teachers, 0)), features=feats, heads=self.heads)
        if self.is_topk:  # the batch's dense teacher term rebuilt on the device (never a whole view's [N, K, C])
            t = {name: a[idx] for name, a in self._topk.items()}
            logits, kept = topk.rebuild(t["index"], t["values"], t["lse"], t["log_tail"], self.store.num_classes, self.temperature)
            return TeacherOut(logits=logits, features=feats, heads=self.heads, kept=kept, ce=t["ce"],
                              log_entropy=t["log_entropy"], temperature=self.temperature)
        return TeacherOut(logits=self._logits[idx].float(), features=feats, heads=self.heads)


class LiveTeachers:
    """Teacher outputs computed on every batch (kept for the cache == online proof and comparisons).

    ``block_rows``/``window_blocks`` follow the store it replays when one is given, so the order
    is the cached run's exactly. ``precision``: the teachers' forward (the run's --precision and
    --channels-last, as cache-teachers runs them with its own), fp32 when None.
    """

    def __init__(self, teachers: list[Teacher], layers: tuple[str, ...], layer_index: dict[str, int], *,
                 block_rows: int = 1, window_blocks: int | None = None, precision: Precision | None = None) -> None:
        self.precision = precision
        self.teachers, self.layers = prepare(teachers, precision) if precision is not None else teachers, layers
        self.num_teachers, self.block_rows, self.window_blocks = len(teachers), block_rows, window_blocks
        self.layer_index = {name: layer_index[name] for name in layers}
        self.heads = [t.model.get_head() for t in teachers]

    def batches(self, plan):
        return _in_memory(plan)

    def check_view(self, view, idx, params, hashes) -> None:
        """Nothing to check: the images are augmented here and now, not read from a store."""

    def teacher_outputs(self, idx: torch.Tensor, x: torch.Tensor, data: Any) -> TeacherOut:
        logits, feats = run_teachers(self.teachers, x, self.layer_index, self.precision)
        feats = {k: [f.clone() for f in v] for k, v in feats.items()}  # out of inference mode, usable by autograd ops
        return TeacherOut(logits=logits.clone(), features=feats, heads=self.heads)


def check_layers(available: dict[str, list], needed: tuple[str, ...], where: str) -> None:
    """Every feature layer the method needs is served by the source."""
    for layer in needed:
        if layer not in available:
            opt = "penultimate" if layer == "penultimate" else f"hint:{layer[4:]}"
            raise CamkdError(f"{where} holds no '{layer}' features, which this method needs; "
                             f"re-cache with 'camkd cache-teachers ... --features {opt}'")
