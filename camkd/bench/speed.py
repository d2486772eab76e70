"""`camkd bench speed`: throughput ratios, measured interleaved in one process.

a. the student alone (`ce`) — the limit; b. distill from the store, every method;
c. the same methods --online (teachers re-run each step); d. cache-teachers against pure
teacher inference on the same batches; e. the reader alone; f. bytes per sample-view.
Throughput of a distill run is its own training-loop figure (images/s of the epoch, evaluation
excluded). Each variant runs in rounds (A B C ... A B C ...) and the median is reported.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import camkd
from camkd.checkpoint import atomic_save
from camkd.data import load_dataset
from camkd.device import resolve_device
from camkd.distill import DistillConfig, distill
from camkd.models import create_model
from camkd.progress import log
from camkd.store import open_store
from camkd.store.writer import CacheConfig, cache_teachers
from camkd.teachers import load_teacher, run_teachers
from camkd.data.views import AugSpec, augment

METHODS = [("kd", None), ("avg", None), ("ebkd", None), ("aekd", None), ("fitnet", None), ("camkd", 0.0), ("camkd", None)]


@dataclass
class SpeedConfig:
    student: str = "vgg8"
    teacher: str = "resnet32x4"
    num_teachers: int = 3
    num_classes: int = 100
    samples: int = 384
    batch_size: int = 64
    repeats: int = 2
    device: str = "auto"
    out: str | None = None
    methods: list[tuple[str, float | None]] | None = None
    online: bool = True


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "camkd": camkd.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _label(method: str, beta: float | None) -> str:
    return f"{method}(beta=0)" if beta == 0.0 else ("camkd+features" if method == "camkd" else method)


def run_speed(cfg: SpeedConfig) -> dict:
    device = resolve_device(cfg.device)
    methods = cfg.methods or METHODS
    work = Path(tempfile.mkdtemp(prefix="camkd-bench-"))
    try:
        return _run(cfg, device, methods, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(cfg: SpeedConfig, device: torch.device, methods, work: Path) -> dict:
    data = dict(dataset="synthetic", synthetic_samples=cfg.samples, synthetic_classes=cfg.num_classes)
    train = load_dataset("synthetic", "train", num_samples=cfg.samples, num_classes=cfg.num_classes)
    # random-weight teachers saved as camkd checkpoints (speed does not depend on the weights)
    ckpts = []
    for k in range(cfg.num_teachers):
        torch.manual_seed(k)
        m = create_model(cfg.teacher, num_classes=cfg.num_classes, in_channels=3)
        meta = {"arch": m.arch, "num_classes": cfg.num_classes, "in_channels": 3}
        path = work / f"teacher{k}.pth"
        atomic_save({"model": m.state_dict(), "meta": meta}, path)
        ckpts.append(str(path))
    results: dict = {"machine": machine(), "device": str(device), "config": {k: v for k, v in cfg.__dict__.items() if k != "methods"}}

    # d. cache-teachers against pure teacher inference, interleaved
    teachers = [load_teacher(p, device=device) for p in ckpts]
    spec = AugSpec(seed=0, norm=train.norm)
    dev_train = train.to(device)
    layers = {"penultimate": -2, "hint2": 2}
    cache_rates, infer_rates = [], []
    stores = {}
    for r in range(cfg.repeats):
        t0 = time.perf_counter()
        for s in range(0, cfg.samples, 256):
            idx = torch.arange(s, min(s + 256, cfg.samples))
            x, _ = augment(dev_train.images, idx, spec, view=0)
            logits, feats = run_teachers(teachers, x, layers)
            logits.to(torch.float16).cpu()
            for f in feats.values():
                for t in f:
                    t.to(torch.float16).cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        infer_rates.append(cfg.samples / (time.perf_counter() - t0))
        path = work / f"store{r}.zarr"
        s = cache_teachers(CacheConfig(teachers=ckpts, **data, views=1, features=["penultimate", "hint:2"],
                                       dtype="float16", batch_size=256, device=str(device), out=str(path), progress=False))
        cache_rates.append(s["samples_per_s"])
        stores["float16"] = path
    results["cache"] = {"inference_samples_per_s": statistics.median(infer_rates),
                        "cache_samples_per_s": statistics.median(cache_rates)}
    results["cache"]["ratio"] = results["cache"]["cache_samples_per_s"] / results["cache"]["inference_samples_per_s"]
    log(f"[bench] cache {results['cache']['ratio']:.3f} of pure inference")

    # f. bytes per sample-view, float16 and float32
    path32 = work / "store32.zarr"
    s32 = cache_teachers(CacheConfig(teachers=ckpts, **data, views=1, features=["penultimate", "hint:2"], dtype="float32",
                                     batch_size=256, device=str(device), out=str(path32), progress=False))
    s16 = cache_teachers(CacheConfig(teachers=ckpts, **data, views=1, features=["penultimate", "hint:2"], dtype="float16",
                                     batch_size=256, device=str(device), out=str(work / "store16.zarr"), progress=False))
    results["bytes_per_sample_view"] = {"float16": s16["bytes_per_sample_view"], "float32": s32["bytes_per_sample_view"]}

    # e. the reader alone
    store = open_store(work / "store16.zarr")
    results["reader"] = _reader_speed(store, cfg.repeats)

    # a, b, c. training throughput, interleaved rounds
    variants = [("ce", None, False)] + [(m, b, False) for m, b in methods]
    if cfg.online:
        variants += [(m, b, True) for m, b in methods]
    rates: dict[str, list[float]] = {}
    for r in range(cfg.repeats + 1):  # round 0 is warm-up
        for method, beta, online in variants:
            name = ("online " if online else "") + _label(method, beta)
            out = work / f"run_{r}_{name.replace(' ', '_')}"
            dc = DistillConfig(arch=cfg.student, method=method, beta=beta, cache=str(work / "store16.zarr"), epochs=1,
                               batch_size=cfg.batch_size, lr=0.01, device=str(device), out=str(out), progress=False,
                               online=online, teachers=ckpts if online else [])
            distill(dc)
            rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
            if r > 0:
                rates.setdefault(name, []).append(rec["images_per_s"])
            shutil.rmtree(out, ignore_errors=True)
        log(f"[bench] training round {r}/{cfg.repeats} done")
    med = {k: statistics.median(v) for k, v in rates.items()}
    limit = med["ce"]
    results["train_images_per_s"] = med
    results["cached_over_ce"] = {k: v / limit for k, v in med.items() if k != "ce" and not k.startswith("online ")}
    results["cached_over_online"] = {k: med[k] / med["online " + k] for k in results["cached_over_ce"] if "online " + k in med}
    results["targets"] = {"logit_methods_over_ce": 0.95, "camkd_features_over_ce": 0.85, "cache_over_inference": 0.90}
    return results


def _reader_speed(store, repeats: int) -> dict:
    out = {}
    t_logit, t_feat, t_stream = [], [], []
    from camkd.data.order import epoch_order as epoch_windows
    from camkd.store.reader import FeatureStream

    for _ in range(repeats):
        t0 = time.perf_counter()
        lg = store.logits(0)
        t_logit.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        feats = store.features("penultimate", 0)
        t_feat.append(time.perf_counter() - t0)
        windows = epoch_windows(store.n, seed=0, epoch=1, block_rows=store.block_rows, window_blocks=1)
        t0 = time.perf_counter()
        for _rows, _f in FeatureStream(store, ("penultimate",), 0, windows):
            pass
        t_stream.append(time.perf_counter() - t0)
    fbytes = sum(f.nbytes for f in feats)
    n = store.n
    out["logits_whole_view"] = {"samples_per_s": n / statistics.median(t_logit), "MB_per_s": lg.numel() * lg.element_size() / 2**20 / statistics.median(t_logit)}
    out["features_whole_view"] = {"samples_per_s": n / statistics.median(t_feat), "MB_per_s": fbytes / 2**20 / statistics.median(t_feat)}
    out["features_streamed"] = {"samples_per_s": n / statistics.median(t_stream), "MB_per_s": fbytes / 2**20 / statistics.median(t_stream)}
    return out


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores" + (f", GPU {m['gpu']}" if "gpu" in m else "") +
             f"; device {r['device']}; torch {m['torch']}; camkd {m['camkd']}; {m['date']}",
             f"Student {r['config']['student']}, {r['config']['num_teachers']} x {r['config']['teacher']} teachers, "
             f"{r['config']['samples']} synthetic {r['config']['num_classes']}-class 32x32 samples, batch {r['config']['batch_size']}, "
             f"median of {r['config']['repeats']} interleaved rounds.", "",
             "| variant | train images/s | cached / ce (limit) | cached / online |", "|---|---|---|---|"]
    med = r["train_images_per_s"]
    lines.append(f"| ce (the limit) | {med['ce']:.0f} | 1.000 | |")
    for k, ratio in r["cached_over_ce"].items():
        online = r["cached_over_online"].get(k)
        lines.append(f"| {k} | {med[k]:.0f} | {ratio:.3f} | {online:.2f}x |" if online else f"| {k} | {med[k]:.0f} | {ratio:.3f} | |")
    for k, v in med.items():
        if k.startswith("online "):
            lines.append(f"| {k} | {v:.0f} | {v / med['ce']:.3f} | |")
    c = r["cache"]
    lines += ["", f"cache-teachers: {c['cache_samples_per_s']:.0f} samples/s vs pure teacher inference "
                  f"{c['inference_samples_per_s']:.0f} samples/s: ratio {c['ratio']:.3f} (target 0.90)", "",
              "| reader | samples/s | MB/s |", "|---|---|---|"]
    for k, v in r["reader"].items():
        lines.append(f"| {k} | {v['samples_per_s']:.0f} | {v['MB_per_s']:.0f} |")
    lines += ["", "| array | bytes per sample-view, float16 | float32 |", "|---|---|---|"]
    for k, v in r["bytes_per_sample_view"]["float16"].items():
        lines.append(f"| {k} | {v:.0f} | {r['bytes_per_sample_view']['float32'].get(k, float('nan')):.0f} |")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Training throughput bars: the limit, cached and online."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = r["train_images_per_s"]
    names = list(med)
    colors = ["gray" if n == "ce" else ("tab:red" if n.startswith("online ") else "tab:blue") for n in names]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.barh(names, [med[n] for n in names], color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("training images/s (gray: student alone; blue: from the store; red: --online)")
    ax.set_title(f"{r['config']['student']} from {r['config']['num_teachers']} x {r['config']['teacher']} on {r['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
