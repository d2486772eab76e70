"""Run under torchrun (or alone): distill every given method from a store, one run folder each.

usage: distill_methods.py STORE OUT MICRO_BATCHES EPOCHS METHOD...
"""

import sys

from camkd.config import DataConfig, OptimConfig, RunConfig
from camkd.distill import DistillConfig, distill

store, out, micro, epochs, *methods = sys.argv[1:]
for method in methods:
    distill(DistillConfig(arch="resnet8", method=method, cache=store, data=DataConfig(dataset=None),
                          optim=OptimConfig(epochs=int(epochs), batch_size=32, lr=0.05, micro_batches=int(micro)),
                          run=RunConfig(seed=7, device="cpu", out=f"{out}/{method}", deterministic=True, progress=False)))
