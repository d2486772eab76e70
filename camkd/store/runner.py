"""What the store needs of the teachers, handed in by whoever loaded them (camkd.cache, camkd.teachers).

The store runs no model code of its own: the writer and cache-verify call ``run`` on augmented
batches, and record ``provenance`` and ``heads`` as they are given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# (images [B, C, H, W] on ``device``, {layer name: feature index}) -> (logits [B, K, C], {layer: [per-teacher features]})
RunTeachers = Callable[[Tensor, dict[str, int]], tuple[Tensor, dict[str, list[Tensor]]]]


@dataclass
class TeacherRunner:
    """The teachers as the store sees them."""

    provenance: list[dict]  # per teacher: arch, checkpoint (file name), path, sha256, num_classes
    heads: list[dict[str, np.ndarray]]  # per teacher: its classifier head's weights, by state_dict key
    device: torch.device
    run: RunTeachers

    @property
    def num_teachers(self) -> int:
        return len(self.provenance)
