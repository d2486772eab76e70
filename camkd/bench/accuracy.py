"""`camkd bench accuracy`: every method and the student alone, several seeds, mean +- std top-1.

Default protocol (a 2-core CPU, about an hour): Fashion-MNIST (real data), three resnet20
teachers (three seeds), a resnet8 student; teachers are cached once into a float32 store, each
method trains from it with every seed, and CA-MKD also runs --online with the first seed: its
accuracy must agree with the cached run. The reference protocol (CIFAR-100, 3 x resnet32x4 ->
vgg8, 240 epochs) is the same command with --dataset cifar100 --teacher-arch resnet32x4
--student vgg8 --teacher-epochs 240 --epochs 240 --limit 0 on a machine with the data and a GPU.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from camkd.bench.common import machine
from camkd.config import DataConfig, OptimConfig, RunConfig
from camkd.distill import DistillConfig, distill
from camkd.methods import list_methods
from camkd.progress import log
from camkd.store.writer import CacheConfig, cache_teachers
from camkd.train import TrainConfig, teacher_optim, train_teacher


@dataclass
class AccuracyConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    teacher_arch: str = "resnet20"
    num_teachers: int = 3
    student: str = "resnet8"
    teacher_epochs: int = 8
    epochs: int = 6
    limit: int | None = 10000
    seeds: int = 3
    batch_size: int = 64
    lr: float = 0.05
    methods: list[str] = field(default_factory=list_methods)
    device: str = "auto"
    out: str = "bench/accuracy-run"
    dtype: str = "float32"
    data_options: dict = field(default_factory=dict)  # dataset loader options (e.g. synthetic's num_samples)


def _decay(epochs: int) -> list[int]:
    """The reference's schedule scaled to the run: lr x0.1 at 62.5%, 75%, 87.5% of the epochs."""
    return sorted({max(1, round(epochs * f)) for f in (0.625, 0.75, 0.875)}) if epochs >= 4 else []


def _history(run_dir: Path) -> list[dict]:
    """Every epoch's record of a run, also those of earlier (resumed) invocations."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_accuracy(cfg: AccuracyConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = DataConfig(dataset=cfg.dataset, data_dir=cfg.data_dir, limit=cfg.limit or None, options=cfg.data_options)
    teachers, teacher_acc = [], []
    for k in range(cfg.num_teachers):
        run_dir = out / "teachers" / f"{cfg.teacher_arch}_{k}"
        optim = teacher_optim()
        optim.epochs, optim.batch_size, optim.lr = cfg.teacher_epochs, cfg.batch_size, cfg.lr
        optim.lr_decay_epochs = _decay(cfg.teacher_epochs)
        s = train_teacher(TrainConfig(arch=cfg.teacher_arch, data=data, optim=optim,
                                      run=RunConfig(out=str(run_dir), resume=(run_dir / "last.pth").exists(),
                                                    device=cfg.device, seed=k, progress=False)))
        teachers.append(str(run_dir / "last.pth"))
        teacher_acc.append(s["last_top1"])
        log(f"[bench] teacher {k}: {s['last_top1']:.2f}%")
    store = out / "teachers.zarr"
    cache_teachers(CacheConfig(teachers=teachers, dataset=cfg.dataset, data_dir=cfg.data_dir, limit=cfg.limit or None,
                               views=cfg.epochs, features=["penultimate", "hint:2"], dtype=cfg.dtype, out=str(store),
                               device=cfg.device, progress=False, options=cfg.data_options))
    curves: dict[str, list[list[float]]] = {}
    finals: dict[str, list[float]] = {}
    runs = [(m, seed, False) for seed in range(cfg.seeds) for m in cfg.methods]
    if "camkd" in cfg.methods:
        runs.append(("camkd", 0, True))
    for method, seed, online in runs:
        name = method + (" --online" if online else "")
        run_dir = out / "students" / f"{method}{'_online' if online else ''}_s{seed}"
        dc = DistillConfig(arch=cfg.student, method=method, cache=str(store), online=online,
                           teachers=teachers if online else [], data=DataConfig(dataset=None, data_dir=cfg.data_dir),
                           optim=OptimConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                             lr_decay_epochs=_decay(cfg.epochs)),
                           run=RunConfig(seed=seed, device=cfg.device, out=str(run_dir),
                                         resume=(run_dir / "last.pth").exists(), progress=False))
        s = distill(dc)
        curve = [rec["test_top1"] for rec in _history(run_dir)]
        curves.setdefault(name, []).append(curve)
        finals.setdefault(name, []).append(s["last_top1"])
        log(f"[bench] {name} seed {seed}: {s['last_top1']:.2f}%")
    table = {name: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v}
             for name, v in finals.items()}
    agree = None
    if "camkd --online" in finals:
        agree = {"cached": finals["camkd"][0], "online": finals["camkd --online"][0],
                 "abs_diff": abs(finals["camkd"][0] - finals["camkd --online"][0])}
    return {"machine": machine(), "config": cfg.__dict__, "teachers": teacher_acc, "table": table, "curves": curves,
            "cache_vs_online": agree}


def to_markdown(r: dict) -> str:
    c = r["config"]
    lines = [f"{c['dataset']} (limit {c['limit']}), {c['num_teachers']} x {c['teacher_arch']} teachers "
             f"({', '.join(f'{a:.2f}' for a in r['teachers'])} % top-1), student {c['student']}, {c['epochs']} epochs, "
             f"{c['seeds']} seeds; {r['machine']['cpu']}, {r['machine']['date']}", "",
             "| method | top-1 % (mean +- std) | runs |", "|---|---|---|"]
    for name, row in r["table"].items():
        lines.append(f"| {name} | {row['mean']:.2f} +- {row['std']:.2f} | {', '.join(f'{x:.2f}' for x in row['runs'])} |")
    if r["cache_vs_online"]:
        a = r["cache_vs_online"]
        lines += ["", f"camkd from the store {a['cached']:.2f}% vs --online {a['online']:.2f}% (seed 0): difference {a['abs_diff']:.2f}"]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Test accuracy per epoch for each method (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in r["curves"].items():
        length = min(len(c) for c in runs)
        mean = [statistics.mean(c[i] for c in runs) for i in range(length)]
        ax.plot(range(1, length + 1), mean, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 %")
    ax.set_title(f"{r['config']['dataset']}: {r['config']['student']} from {r['config']['num_teachers']} x {r['config']['teacher_arch']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save(r: dict, path: Path) -> list[str]:
    """The result as JSON, its table as Markdown and its plot as PNG beside it; returns the paths."""
    from camkd.bench.common import write_result

    return write_result(r, path, to_markdown(r), plot)
