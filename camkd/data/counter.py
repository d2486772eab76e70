"""The counter hash every seeded draw of camkd comes from, and the one table of its field numbers.

A draw is splitmix64 over (seed, view, sample index, field), computed in numpy's uint64 arithmetic, which wraps by
definition: no global RNG state, so the same key gives the same bits whatever the batch, its order, the process or
the machine. The field tells the draws of one sample apart. Each field number below belongs to one draw of one
recipe, and stores and runs made before replay only while every number keeps its meaning
(``tests/test_golden_views.py``), so they are handed out here, in one place: a new draw takes an unused number.
"""

from __future__ import annotations

import numpy as np

# -- the field numbers, one table ------------------------------------------------------------------------------------
CROP_DX, CROP_DY, CROP_FLIP = 0, 1, 2  # the 32-px recipe (views.py): crop offsets and the flip bit
ORDER = 11  # the epoch order (order.py): one draw per (seed, epoch) seeds the permutation
RRC_FLIP = 12  # RandomResizedCrop (rrc.py): the flip bit
RRC_TRIES = 10  # RandomResizedCrop's tries, 4 draws each:
RRC_TRY0 = 16  # try t draws from fields 16 + 4 t + (0 area fraction, 1 log ratio, 2 top, 3 left): 16..55

FIELDS = {
    "crop dx": CROP_DX, "crop dy": CROP_DY, "crop flip": CROP_FLIP, "epoch order": ORDER, "rrc flip": RRC_FLIP,
    **{f"rrc try {t} {part}": RRC_TRY0 + 4 * t + k for t in range(RRC_TRIES)
       for k, part in enumerate(("area", "log ratio", "top", "left"))},
}  # every field in use, by its draw (a test checks no two draws share one)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def hash_counter(seed: int, view: int, indices: np.ndarray, field: int) -> np.ndarray:
    """64-bit hash of (seed, view, index, field) for each index."""
    key = _mix(np.full(1, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
    key = _mix(key ^ np.uint64(view))
    key = _mix(key ^ np.uint64(field))
    return _mix(key ^ np.asarray(indices, dtype=np.uint64))


def hash_fields(seed: int, view: int, indices: np.ndarray, fields: np.ndarray) -> np.ndarray:
    """:func:`hash_counter` of every index (rows) and field (columns), [n, F] uint64, in one vectorized pass: the
    per-call overhead of numpy, not the arithmetic, dominates for one image's few draws."""
    key = _mix(np.full(1, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
    key = _mix(key ^ np.uint64(view))
    keys = _mix(key ^ np.asarray(fields, dtype=np.uint64))
    return _mix(keys[None, :] ^ np.asarray(indices, dtype=np.uint64).reshape(-1, 1))
