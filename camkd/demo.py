"""The main job on the embedded default: a small real run on Fashion-MNIST, end to end on a CPU.

Three small teachers train briefly, run once over seeded views into a Zarr store, and a student
is distilled from the store with CA-MKD and with AVER-MKD (no teacher runs while it trains).
"""

from __future__ import annotations

import time
from pathlib import Path

from camkd.cache import CacheConfig, cache_teachers
from camkd.config import DataConfig, OptimConfig, RunConfig
from camkd.distill import DistillConfig, distill
from camkd.progress import log
from camkd.train import TrainConfig, teacher_optim, train_teacher

DEMO_TEACHERS = ("resnet20", "resnet14", "wrn_16_1")
DEMO_STUDENT = "resnet8"
DEMO_METHODS = ("camkd", "avg")


def _last_epoch_decay(epochs: int) -> list[int]:
    """A short run's schedule: lr x0.1 for the last epoch (the reference decays late in its 240 epochs too)."""
    return [epochs - 1] if epochs > 1 else []


def run_demo(*, out: Path, data_dir: Path | None, epochs: int, limit: int | None, device: str, progress: bool) -> str:
    """Teachers -> store -> students; returns a table of teacher and student test accuracy.

    Each setting has its own folder under ``out`` (``epochs3_limit10000``): a rerun with the same
    settings continues or reuses its runs, and other settings never resume runs made for these.
    """
    t0 = time.perf_counter()
    out = out / f"epochs{epochs}_limit{limit or 'all'}"
    dd = str(data_dir) if data_dir else None
    rows, ckpts = [], []
    for trial, arch in enumerate(DEMO_TEACHERS):
        run_dir = out / "teachers" / arch
        optim = teacher_optim()
        optim.epochs, optim.lr, optim.lr_decay_epochs = epochs, 0.05, _last_epoch_decay(epochs)
        cfg = TrainConfig(arch=arch, data=DataConfig(dataset="fashion-mnist", data_dir=dd, limit=limit), optim=optim,
                          run=RunConfig(out=str(run_dir), resume=(run_dir / "last.pth").exists(), device=device, seed=trial,
                                        progress=progress))
        log(f"[demo] teacher {arch}: {epochs} epochs on {limit or 'all'} fashion-mnist images")
        s = train_teacher(cfg)
        rows.append((f"teacher {arch}", s["last_top1"]))
        ckpts.append(str(run_dir / "last.pth"))
    store = out / "fashion-mnist.zarr"
    log(f"[demo] caching {len(ckpts)} teachers over {epochs} views into {store}")
    cache_teachers(CacheConfig(teachers=ckpts, dataset="fashion-mnist", data_dir=dd, limit=limit, views=epochs,
                               features=["penultimate"], dtype="float16", device=device, out=str(store),
                               overwrite=True, progress=progress))
    for method in DEMO_METHODS:
        log(f"[demo] student {DEMO_STUDENT} with {method} from the store")
        run_dir = out / "students" / method
        s = distill(DistillConfig(arch=DEMO_STUDENT, method=method, cache=str(store), data=DataConfig(dataset=None, data_dir=dd),
                                  optim=OptimConfig(epochs=epochs, lr=0.05, lr_decay_epochs=_last_epoch_decay(epochs)),
                                  run=RunConfig(out=str(run_dir), resume=(run_dir / "last.pth").exists(), device=device,
                                                progress=progress)))
        rows.append((f"student {DEMO_STUDENT} ({method}, from cache)", s["last_top1"]))
    lines = ["| model | test top-1 % |", "|---|---|"] + [f"| {name} | {acc:.2f} |" for name, acc in rows]
    lines.append(f"\n{time.perf_counter() - t0:.0f} s in all; runs and store in {out}")
    return "\n".join(lines)
