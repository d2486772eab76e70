"""The main job on the embedded default: a small real run on Fashion-MNIST, end to end on a CPU."""

from __future__ import annotations

import time
from pathlib import Path

from camkd.progress import log
from camkd.train import TrainConfig, train_teacher

DEMO_TEACHERS = ("resnet20", "resnet14", "wrn_16_1")


def run_demo(*, out: Path, data_dir: Path | None, epochs: int, limit: int | None, device: str, progress: bool) -> str:
    """Train small teachers briefly on Fashion-MNIST; returns a table of their test accuracy."""
    t0 = time.perf_counter()
    rows = []
    for trial, arch in enumerate(DEMO_TEACHERS):
        run_dir = out / "teachers" / arch
        cfg = TrainConfig(arch=arch, dataset="fashion-mnist", data_dir=str(data_dir) if data_dir else None, epochs=epochs,
                          batch_size=64, lr=0.05, lr_decay_epochs=[], limit=limit, device=device, seed=trial,
                          out=str(run_dir), resume=(run_dir / "last.pth").exists(), progress=progress)
        log(f"[demo] teacher {arch}: {epochs} epochs on {limit or 'all'} fashion-mnist images")
        s = train_teacher(cfg)
        rows.append((f"teacher {arch}", s["last_top1"], s["best_top1"]))
    lines = ["| model | last top-1 % | best top-1 % |", "|---|---|---|"]
    lines += [f"| {name} | {last:.2f} | {best:.2f} |" for name, last, best in rows]
    lines.append(f"\n{time.perf_counter() - t0:.0f} s in all; runs in {out}")
    return "\n".join(lines)
