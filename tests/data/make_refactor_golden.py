"""Golden values of a cached distillation run, made with the code before the issue-9 refactor.

Run against commit 6a257eb (the old API): `git worktree add /tmp/old 6a257eb; cd /tmp/old; python THIS WORKDIR OUT.json`.
"""
import json, sys, shutil
from pathlib import Path
import torch
torch.set_num_threads(2)
from camkd.models import create_model
from camkd.store.writer import CacheConfig, cache_teachers
from camkd.distill import DistillConfig, distill

work = Path(sys.argv[1]); shutil.rmtree(work, ignore_errors=True); work.mkdir(parents=True)
specs = []
for k, arch in enumerate(["resnet8", "resnet14"]):
    torch.manual_seed(100 + k)
    m = create_model(arch, num_classes=10, in_channels=3)
    torch.save({"model": m.state_dict()}, work / f"t{k}.pth")
    specs.append(f"{arch}={work / f't{k}.pth'}")
cache_teachers(CacheConfig(teachers=specs, dataset="synthetic", limit=256, views=2, seed=3,
                           features=["penultimate"], dtype="float32", out=str(work / "s.zarr"), device="cpu", progress=False))
out = {}
for name, mb in (("camkd_memory", 4096.0), ("camkd_streamed", 0.001), ("avg", 4096.0)):
    method = "avg" if name == "avg" else "camkd"
    distill(DistillConfig(arch="resnet8", method=method, cache=str(work / "s.zarr"), epochs=2, batch_size=32, seed=5,
                          device="cpu", out=str(work / name), deterministic=True, progress=False, feature_memory_mb=mb, window_blocks=2))
    ck = torch.load(work / name / "last.pth", weights_only=True)
    sums = {}
    for part in ("model", "method"):
        for k, v in ck[part].items():
            if v.is_floating_point():
                sums[f"{part}.{k}"] = [float(v.double().sum()), float(v.double().pow(2).sum())]
    out[name] = sums
json.dump(out, open(sys.argv[2], "w"), indent=0, sort_keys=True)
print({k: len(v) for k, v in out.items()})
