"""Run under torchrun: distill (camkd, 2 epochs) from STORE into OUT; each rank writes OUT-rank{R}.json with its summary.

usage: distill_staged.py STORE OUT
"""

import json
import os
import sys

from camkd.config import DataConfig, OptimConfig, RunConfig
from camkd.distill import DistillConfig, distill

store, out = sys.argv[1:]
s = distill(DistillConfig(arch="resnet8", method="camkd", cache=store, data=DataConfig(dataset=None),
                          optim=OptimConfig(epochs=2, batch_size=32, lr=0.02, micro_batches=int(os.environ.get("MICRO", "1"))),
                          run=RunConfig(seed=1, device="cpu", out=out, deterministic=True, progress=False)))
with open(f"{out}-rank{os.environ.get('RANK', '0')}.json", "w") as f:
    json.dump({k: s[k] for k in ("staged_bytes", "last_top1")}, f)
