"""Where teacher targets come from during distillation: the store (cached) or the teachers (online).

Both produce, for a batch of sample indices of one view, the same TeacherOut. The cached
source holds a view's logits on the device (one read) and its features whole when they fit
the memory budget, otherwise streams them in windows of contiguous blocks (reader.py).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from camkd.errors import CamkdError
from camkd.methods import TeacherOut
from camkd.store.reader import FeatureStream, TeacherStore, epoch_windows
from camkd.teachers import Teacher, run_teachers

Batch = tuple[np.ndarray, dict[str, list[torch.Tensor]]]


def _to_float(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def plan_windows(n: int, *, seed: int, epoch: int, block_rows: int, window_blocks: int | None) -> list[np.ndarray]:
    return epoch_windows(n, seed=seed, epoch=epoch, block_rows=block_rows, window_blocks=window_blocks)


def batch_stream(windows: Iterator[tuple[np.ndarray, dict[str, list]]], batch_size: int) -> Iterator[Batch]:
    """Cut windows of (indices, per-row features) into full batches; the trailing partial batch is dropped."""
    cur_idx = np.zeros(0, dtype=np.int64)
    cur_feat: dict[str, list[np.ndarray]] = {}
    pos = 0
    for rows, feats in windows:
        if cur_feat:
            cur_feat = {name: [np.concatenate([a[pos:], b]) for a, b in zip(cur_feat[name], feats[name])] for name in feats}
        else:
            cur_feat = dict(feats)
        cur_idx = np.concatenate([cur_idx[pos:], rows])
        pos = 0
        while len(cur_idx) - pos >= batch_size:
            yield cur_idx[pos : pos + batch_size], {name: [a[pos : pos + batch_size] for a in per] for name, per in cur_feat.items()}
            pos += batch_size


class CachedTargets:
    """Teacher targets read from a store."""

    def __init__(self, store: TeacherStore, layers: tuple[str, ...], device: torch.device, *, memory_budget_mb: float,
                 window_blocks: int) -> None:
        self.store, self.layers, self.device = store, layers, device
        self.heads = store.heads(device)
        fits = store.feature_bytes_per_view(layers) <= memory_budget_mb * 2**20
        self.window_blocks: int | None = None if (not layers or fits) else window_blocks
        self._view = -1
        self._logits: torch.Tensor | None = None
        self._feats: dict[str, list[torch.Tensor]] = {}

    def begin_view(self, view: int) -> None:
        if view == self._view:
            return
        self._logits = self.store.logits(view, self.device)
        self._feats = {}
        if self.window_blocks is None:
            for layer in self.layers:
                self._feats[layer] = [torch.from_numpy(a).to(self.device) for a in self.store.features(layer, view)]
        self._view = view

    def batches(self, view: int, windows: list[np.ndarray], batch_size: int) -> Iterator[tuple[np.ndarray, TeacherOut | None]]:
        """(indices, targets) per batch; targets None means 'compute from the images' (never for this source)."""
        self.begin_view(view)
        if self.window_blocks is None or not self.layers:
            source = ((w, {}) for w in windows)
        else:
            source = iter(FeatureStream(self.store, self.layers, view, windows))
        for idx, streamed in batch_stream(source, batch_size):
            it = torch.from_numpy(idx).to(self.device)
            logits = _to_float(self._logits[it])
            if self.window_blocks is None:
                feats = {layer: [_to_float(f[it]) for f in per] for layer, per in self._feats.items()}
            else:
                feats = {layer: [_to_float(torch.from_numpy(a).to(self.device)) for a in per] for layer, per in streamed.items()}
            yield idx, TeacherOut(logits=logits, features=feats, heads=self.heads)

    def aug(self, view: int) -> np.ndarray:
        return self.store.aug(view)


class OnlineTargets:
    """Teacher targets computed live on each batch (the reference's way; kept for proof and comparison)."""

    def __init__(self, teachers: list[Teacher], layers: tuple[str, ...], layer_index: dict[str, int], *,
                 window_blocks: int | None = None) -> None:
        self.teachers, self.layers = teachers, layers
        self.layer_index = {name: layer_index[name] for name in layers}
        self.heads = [t.model.get_head() for t in teachers]
        self.window_blocks = window_blocks

    def batches(self, view: int, windows: list[np.ndarray], batch_size: int) -> Iterator[tuple[np.ndarray, TeacherOut | None]]:
        for idx, _ in batch_stream(((w, {}) for w in windows), batch_size):
            yield idx, None

    def compute(self, x: torch.Tensor) -> TeacherOut:
        logits, feats = run_teachers(self.teachers, x, self.layer_index)
        feats = {k: [f.clone() for f in v] for k, v in feats.items()}  # out of inference mode, usable by autograd ops
        return TeacherOut(logits=logits.clone(), features=feats, heads=self.heads)


def check_layers(available: dict[str, list], needed: tuple[str, ...], where: str) -> None:
    for layer in needed:
        if layer not in available:
            opt = "penultimate" if layer == "penultimate" else f"hint:{layer[4:]}"
            raise CamkdError(f"{where} holds no '{layer}' features, which this method needs; "
                             f"re-cache with 'camkd cache-teachers ... --features {opt}'")
