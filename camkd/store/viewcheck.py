"""The view check: a batch's replayed views against what the store recorded of the views the teachers saw.

Distillation (``StoreTeachers.check_view``, every batch) and ``cache-verify -t`` (a sample) both run it. The store
keeps each (view, sample)'s augmentation parameters (``aug``: the 32-px recipe's crop and flip, or an image folder's
RandomResizedCrop box and flip) and, for image folders, a CRC-32 of the uint8 view the teachers saw (``pixels``).
The student's side recomputes both from the seeded counter hash and the files: the boxes are recomputed, not read from
the store, on purpose, because equal boxes prove the seeded replay is the teachers' augmentation, and equal CRC-32s
prove the decoded pixels are theirs (same files, same decoder). A difference is named by its first sample.
"""

from __future__ import annotations

import numpy as np


def first_differing_row(stored: np.ndarray, replayed: np.ndarray) -> int | None:
    """The first row (sample of the batch) where ``replayed`` differs from ``stored``; None when they are equal."""
    stored, replayed = np.asarray(stored), np.asarray(replayed)
    if np.array_equal(stored, replayed):
        return None
    differs = (stored != replayed).reshape(len(stored), -1).any(axis=1)
    return int(np.flatnonzero(differs)[0])


def versions_text(v: dict | None) -> str:
    """``decoder pillow-rgb+crop+bilinear, pillow 11.0`` (a store's or this machine's decoder versions)."""
    return ", ".join(f"{k} {val}" for k, val in (v or {}).items()) or "not recorded"


def pixels_differ_why(stored_versions: dict | None, here_versions: dict) -> str:
    """Why a view's pixels differ from the stored CRC-32: another decoder, or (the same decoder) another file content."""
    if stored_versions == here_versions:  # the same decoder, so the file itself changed (its size did not: the listing matched)
        return (f"this machine decodes with the store's versions ({versions_text(here_versions)}), so the file's content "
                "changed since the store was written; restore it, or re-cache from this folder")
    return (f"the store's decoder: {versions_text(stored_versions)}; this machine's: {versions_text(here_versions)}; "
            "distill with the store's decoder versions (or re-cache on this machine)")
