"""One epoch's plan: its global index batches, computed once, fed to both the data and the teacher source.

The loop (:mod:`camkd.fit`) makes an :class:`EpochPlan` per epoch and hands the same batches to the
split's ``view_batches`` (each rank's rows of them: the images) and to the teacher source's ``batches``
(the teachers' outputs of them, e.g. features streamed from a store), so the two cannot fall out of step:
nothing else cuts the epoch into batches.

An image folder's view boxes are recomputed, on purpose, by the decoding workers from the plan's indices,
not read from the store: the store source then compares them (and the pixels' CRC-32s) with the store's
``aug`` on every batch (``check_view``). That comparison is the proof that the student sees the image the
teachers saw; reading the boxes from the store would skip it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from camkd.data.order import epoch_order, view_of_epoch
from camkd.data.views import EpochRows


@dataclass(frozen=True)
class EpochPlan:
    """The global index batches of one epoch, in order, with the read windows they were cut from.

    ``windows``: the seeded order (:func:`camkd.data.order.epoch_order`) in the teacher source's read windows;
    ``batches``: the global batches that train (a trailing batch that does not split into the slices of a
    global batch is left out); ``starts``: where each batch begins in the epoch's order (the windows
    concatenated), so a source can cut per-row data it streams window by window at the same places.
    """

    view: int
    windows: tuple[np.ndarray, ...]
    batches: tuple[np.ndarray, ...]
    starts: tuple[int, ...]

    @classmethod
    def of(cls, n: int, *, seed: int, epoch: int, views: int, batch_size: int, drop_last: bool, slices: int = 1,
           block_rows: int = 1, window_blocks: int | None = None) -> EpochPlan:
        """Epoch ``epoch`` (1-based) of ``n`` samples: view (e - 1) mod ``views``, the seeded order in the source's
        windows (``block_rows``, ``window_blocks``), cut into global batches that split into ``slices`` (ranks x
        micro-batches) of at least 2."""
        windows = epoch_order(n, seed=seed, epoch=epoch, block_rows=block_rows, window_blocks=window_blocks)
        return cls.cut(view_of_epoch(epoch, views), windows, batch_size, drop_last=drop_last, slices=slices)

    @classmethod
    def cut(cls, view: int, windows: list[np.ndarray], batch_size: int, *, drop_last: bool, slices: int = 1) -> EpochPlan:
        """``windows`` cut into batches of ``batch_size``; a trailing batch is kept only if ``drop_last`` is false and
        it has at least 2 rows (BatchNorm cannot train on one); only batches that split into ``slices`` are kept."""
        order = np.concatenate(windows) if windows else np.zeros(0, dtype=np.int64)
        starts = list(range(0, len(order) - batch_size + 1, batch_size))
        tail = len(starts) * batch_size
        if not drop_last and len(order) - tail >= 2:
            starts.append(tail)
        batches = [(s, order[s : s + batch_size]) for s in starts]
        kept = [(s, b) for s, b in batches if len(b) % slices == 0 and len(b) // slices >= 2]
        return cls(view, tuple(windows), tuple(b for _, b in kept), tuple(s for s, _ in kept))

    def rank_batches(self, rank: int, ranks: int) -> list[np.ndarray]:
        """Rank ``rank``'s rows of every batch (what that rank's data loads)."""
        return [b[rank_rows(len(b), rank, ranks)] for b in self.batches]

    def rank_rows(self, rank: int, ranks: int) -> EpochRows:
        """:meth:`rank_batches` as one array (:class:`~camkd.data.views.EpochRows`), to be copied to the device once
        per epoch and sliced per step (in-memory data); an image folder's workers still decode it batch by batch."""
        return EpochRows(self.rank_batches(rank, ranks))


def rank_rows(rows: int, rank: int, ranks: int) -> slice:
    """Rank ``rank``'s contiguous share of a global batch of ``rows`` rows (``ranks`` equal shares)."""
    per = rows // ranks
    return slice(rank * per, (rank + 1) * per)
