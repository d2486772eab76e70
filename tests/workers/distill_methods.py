"""Run under torchrun (or alone): distill each METHOD@STORE given, one run folder each (OUT/METHOD-STORENAME).

usage: distill_methods.py OUT MICRO_BATCHES EPOCHS METHOD@STORE...
"""

import sys
from pathlib import Path

from camkd.config import DataConfig, OptimConfig, RunConfig
from camkd.distill import DistillConfig, distill

out, micro, epochs, *runs = sys.argv[1:]
for run in runs:
    method, store = run.split("@", 1)
    distill(DistillConfig(arch="resnet8", method=method, cache=store, data=DataConfig(dataset=None),
                          optim=OptimConfig(epochs=int(epochs), batch_size=32, lr=0.05, micro_batches=int(micro)),
                          run=RunConfig(seed=7, device="cpu", out=f"{out}/{method}-{Path(store).stem}", deterministic=True,
                                        progress=False)))
