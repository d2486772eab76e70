"""What the golden test pins, and the script that regenerates tests/data/golden_views.json.

Only machine-independent values are pinned: integer hashing, numpy's seeded permutations and
integer crop/flip of uint8 pixels give the same bytes on every CPU (floats of training do not:
they differ across instruction sets and compound over steps). A change here changes every store
and every run's sample order: regenerate only on purpose (`python tests/data/golden_views.py`).
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from camkd.data.order import epoch_order
from camkd.data.synthetic import SYNTH_NORM
from camkd.data.augspec import AugSpec
from camkd.data.views import apply_params, view_params

GOLDEN = Path(__file__).with_name("golden_views.json")


def digest(a: np.ndarray | torch.Tensor) -> str:
    arr = a.numpy() if isinstance(a, torch.Tensor) else a
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def pinned() -> dict[str, str]:
    """sha256 of: view parameters (seeds 0 and 3, views 0 and 1, 1000 samples), the epoch orders (whole and
    windowed over blocks), and the uint8 pixels that those parameters make of a fixed integer image batch."""
    out = {}
    idx = np.arange(1000)
    for seed in (0, 3):
        for view in (0, 1):
            out[f"params_seed{seed}_view{view}"] = digest(view_params(AugSpec(seed=seed, norm=SYNTH_NORM), view, idx))
    for epoch in (1, 2, 3):
        out[f"order_seed5_epoch{epoch}"] = digest(np.concatenate(epoch_order(1000, seed=5, epoch=epoch)))
        out[f"order_windowed_seed5_epoch{epoch}"] = digest(
            np.concatenate(epoch_order(1000, seed=5, epoch=epoch, block_rows=64, window_blocks=2)))
    images = torch.arange(64 * 3 * 32 * 32, dtype=torch.int64).mul(7919).remainder(251).to(torch.uint8).view(64, 3, 32, 32)
    params = view_params(AugSpec(seed=3, norm=SYNTH_NORM), 1, np.arange(64))
    out["pixels_seed3_view1"] = digest(apply_params(images, params))
    return out


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(pinned(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
