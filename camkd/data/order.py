"""The one seeded epoch order and the one rule for which view an epoch uses.

Every job (teacher training, cached or online distillation, benchmarks) takes its sample
order from :func:`epoch_order`, a pure function of (seed, epoch, n, block layout): the same
on every process and device, so W ranks can each take their slice of the same global batch.
"""

from __future__ import annotations

import numpy as np

from camkd.data.counter import ORDER, hash_counter


def view_of_epoch(epoch: int, views: int) -> int:
    """Epoch e (1-based) uses view (e - 1) mod V; with V >= epochs every epoch sees a fresh view."""
    return (epoch - 1) % views


def block_slice(b: int, n: int, block_rows: int) -> slice:
    """Rows of block ``b`` of ``n`` rows cut into blocks of ``block_rows``."""
    return slice(b * block_rows, min((b + 1) * block_rows, n))


def epoch_order(n: int, *, seed: int, epoch: int, block_rows: int = 1, window_blocks: int | None = None) -> list[np.ndarray]:
    """The sample order of one epoch, as windows of int64 indices (concatenated, a permutation of 0..n-1).

    window_blocks None: one window, a full permutation (everything the step needs is in memory).
    Otherwise (features streamed from a store): blocks of ``block_rows`` contiguous rows in a
    seeded shuffled order, grouped ``window_blocks`` at a time, the rows of each group shuffled
    among themselves, so a reader holds one window of blocks at a time.
    """
    key = int(hash_counter(seed, epoch, np.zeros(1, dtype=np.int64), ORDER)[0] >> np.uint64(1))
    rng = np.random.default_rng(key)
    if window_blocks is None:
        return [rng.permutation(n).astype(np.int64)]
    nb = (n + block_rows - 1) // block_rows
    blocks = rng.permutation(nb)
    windows = []
    for w in range(0, nb, window_blocks):
        rows = np.concatenate([np.arange(*block_slice(int(b), n, block_rows).indices(n)) for b in blocks[w : w + window_blocks]])
        windows.append(rows[rng.permutation(len(rows))].astype(np.int64))
    return windows
