"""`camkd bench data`: camkd's image-folder loader against torchvision's, side by side on the same JPEGs.

Both deliver model-ready training batches of RandomResizedCrop + horizontal-flip views, normalized with
ImageNet's statistics, on the device:

- camkd: ``FolderDataset.view_batches`` (workers decode, crop and resize with Pillow, hash each uint8 view
  (CRC-32) and send uint8 batches; the batch is normalized on the device by ``norm.normalize``);
- torchvision: ``ImageFolder`` + ``DataLoader`` with ``RandomResizedCrop`` / ``RandomHorizontalFlip`` /
  ``ToTensor`` / ``Normalize`` per sample in the workers (float32 batches).

Each pass reads every image once in a seeded order, ``batch_size`` at a time, with the same number of
worker processes (0: the main process). Loaders are made once per worker count with persistent workers
and warmed up by one untimed round, so worker start-up is not timed. Variants run in interleaved rounds
(camkd, torchvision, camkd, ...) and the median images/s of ``repeats`` rounds is reported; the main
process runs torch at one thread (DataLoader workers always do). The images are generated (smooth
colour fields with fine texture, JPEG quality 90, ``width`` x ``height`` and its transpose alternately)
into a temporary folder, or into ``root``; a split folder (``train/``, ``val/``) that ``root`` already holds is used
as it is.

Then the store's two ratios, on the same folder and camkd's loader at the largest worker count, with views of
``store_image_size`` px (said in the output) and random-init teachers saved to files (speed ignores the weights):

- cache-teachers (``-f none``, ``VIEWS`` views, ``cache_teachers``'s own samples/s) against plain inference: a loop that
  only runs the same teachers (inference mode) over a fresh loader's batches of the same views, the logits copied to
  the host;
- distillation from the store (``kd``, ``avg``) against the student alone (``ce``) on that loader: ``distill``'s own
  images/s over epochs 2..``EPOCHS`` (the workers up, evaluation excluded).

Both run in interleaved rounds, the order rotated each round (no part always first), after an untimed warm-up round;
medians are reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from camkd.bench.common import device_info, device_text, machine
from camkd.bench.config import DataBenchConfig
from camkd.device import resolve_device
from camkd.errors import CamkdError
from camkd.output import new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TARGET = 1.3  # camkd's images/s over torchvision's, at every worker count (issue 17)
STORE_TARGETS = {"distill_over_ce": 0.95, "cache_over_inference": 0.90}  # issue 17: logit methods; the store's writer
METHODS = ("kd", "avg")  # logit methods timed against ce
VIEWS = 3  # cached views: distill's epochs 1..3 read views 0..2 (epoch e reads view e - 1)
EPOCHS = 3  # distill's epochs; 2..EPOCHS are timed (epoch 1 starts the workers)


def make_images(root: Path, cfg: DataBenchConfig) -> None:
    """``cfg.images`` JPEGs in ``root/train/classK/`` and one per class in ``root/val/classK/`` (distill evaluates
    on it), each split only when missing: smooth random colour fields (bicubic upsampled 8x6 noise) plus fine noise,
    so they compress and decode like photographs rather than like noise or flat colour."""
    from PIL import Image

    for seed, (split, count) in enumerate((("train", cfg.images), ("val", cfg.classes))):
        if (root / split).is_dir():
            continue
        rng = np.random.default_rng(seed)
        for i in range(count):
            w, h = (cfg.width, cfg.height) if i % 2 == 0 else (cfg.height, cfg.width)
            coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
            a = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, size=(h, w, 3), dtype=np.int16)
            folder = root / split / f"class{i % cfg.classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f"img{i:05d}.jpg", quality=cfg.quality)


class _CamkdPass:
    """One pass of camkd's loader: uint8 views from the workers, normalized on the device."""

    def __init__(self, root: Path, cfg: DataBenchConfig, workers: int, device: torch.device) -> None:
        from camkd.data import load_dataset

        self.data = load_dataset("imagefolder", "train", data_dir=root, image_size=cfg.image_size, workers=workers)
        self.spec, self.device, self.batch, self.view = self.data.aug_spec(0), device, cfg.batch_size, 0

    def __call__(self, order: np.ndarray) -> int:
        from camkd.data.norm import normalize

        batches = [order[s : s + self.batch] for s in range(0, len(order), self.batch)]
        n = 0
        for x, _, _ in self.data.view_batches(self.spec, self.view, batches, self.device):
            n += len(normalize(x, self.spec.norm))
        self.view += 1  # every pass reads other views, as the epochs of a run do
        return n


class _TorchvisionPass:
    """One pass of torchvision's ImageFolder + DataLoader with the standard training transforms."""

    def __init__(self, root: Path, cfg: DataBenchConfig, workers: int, device: torch.device) -> None:
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        from camkd.data.folder import IMAGENET_NORM, Replay

        tf = transforms.Compose([transforms.RandomResizedCrop(cfg.image_size), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize(IMAGENET_NORM.mean, IMAGENET_NORM.std)])
        self.folder, self.device, self.batch = datasets.ImageFolder(str(root / "train"), transform=tf), device, cfg.batch_size
        self.replay = Replay()  # the batches of the next pass: one loader, its workers kept across passes
        self.loader = DataLoader(self.folder, batch_sampler=self.replay, num_workers=workers,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def __call__(self, order: np.ndarray) -> int:
        idx = order.tolist()
        self.replay.batches = [idx[s : s + self.batch] for s in range(0, len(idx), self.batch)]
        n = 0
        for x, _ in self.loader:
            n += len(x.to(self.device, non_blocking=True))
        return n


def _timed(run: Callable[[np.ndarray], int], order: np.ndarray, device: torch.device) -> float:
    """Images/s of one pass (the device synchronized at the end)."""
    t0 = time.perf_counter()
    n = run(order)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)


def _measure(root: Path, cfg: DataBenchConfig, device: torch.device, n: int) -> dict[str, dict[str, list[float]]]:
    """Images/s of every timed round per worker count and loader, from interleaved rounds after one warm-up round."""
    loaders = {w: {"camkd": _CamkdPass(root, cfg, w, device), "torchvision": _TorchvisionPass(root, cfg, w, device)}
               for w in cfg.workers}
    rates: dict[tuple[str, int], list[float]] = {}
    rng = np.random.default_rng(0)
    for round_ in range(cfg.repeats + 1):
        for w, pair in loaders.items():
            order = rng.permutation(n)
            for name, run in pair.items():
                rate = _timed(run, order, device)
                if round_ > 0:  # round 0 warms the workers, the page cache and the allocator
                    rates.setdefault((name, w), []).append(rate)
    return {str(w): {name: rates[(name, w)] for name in ("camkd", "torchvision")} for w in cfg.workers}


def _teachers(cfg: DataBenchConfig, num_classes: int, work: Path) -> list[str]:
    """Random-init teachers of ``cfg.teacher_archs`` saved as camkd checkpoints."""
    from camkd.checkpoint import atomic_save
    from camkd.models import create_model

    paths = []
    for k, arch in enumerate(cfg.teacher_archs):
        torch.manual_seed(k)
        m = create_model(arch, num_classes=num_classes, in_channels=3)
        path = work / f"teacher{k}.pth"
        atomic_save({"model": m.state_dict(), "meta": {"arch": m.arch, "num_classes": num_classes, "in_channels": 3}}, path)
        paths.append(str(path))
    return paths


def _inference_rate(root: Path, cfg: DataBenchConfig, teachers: list, workers: int, device: torch.device) -> float:
    """Sample-views/s of the teachers alone over a fresh loader's batches of the cached views (what cache-teachers
    computes, nothing written; the loader's start inside the timing, as in cache-teachers)."""
    from camkd.data import load_dataset
    from camkd.data.norm import normalize
    from camkd.teachers import run_teachers

    data = load_dataset("imagefolder", "train", data_dir=root, image_size=cfg.store_image_size, workers=workers)
    spec, n = data.aug_spec(0), len(data)
    batches = [np.arange(s, min(s + cfg.batch_size, n)) for s in range(0, n, cfg.batch_size)]
    t0 = time.perf_counter()
    for view in range(VIEWS):
        for x, _, _ in data.view_batches(spec, view, batches, device):
            logits, _ = run_teachers(teachers, normalize(x, spec.norm), {})
            logits.to(torch.float16).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n * VIEWS / (time.perf_counter() - t0)


def _cache(root: Path, cfg: DataBenchConfig, ckpts: list[str], workers: int, device: torch.device, out: Path) -> float:
    """cache-teachers' own sample-views/s writing ``VIEWS`` views of logits (-f none) of the folder."""
    from camkd.cache import CacheConfig, cache_teachers

    s = cache_teachers(CacheConfig(teachers=ckpts, dataset="imagefolder", data_dir=str(root), views=VIEWS, features=[],
                                   batch_size=cfg.batch_size, device=str(device), out=str(out), progress=False,
                                   evaluate=False, options={"image_size": cfg.store_image_size, "workers": workers}))
    return s["samples_per_s"]


def _distill(root: Path, cfg: DataBenchConfig, store: Path, method: str, workers: int, device: torch.device, out: Path) -> float:
    """distill's images/s from the store over epochs 2..EPOCHS (the workers up; evaluation excluded): their images over
    their training time, from the run's per-epoch records."""
    from camkd.config import DataConfig, OptimConfig, RunConfig
    from camkd.distill import DistillConfig, distill

    s = distill(DistillConfig(arch=cfg.student, method=method, cache=str(store),
                              data=DataConfig(dataset=None, data_dir=str(root), options={"workers": workers}),
                              optim=OptimConfig(epochs=EPOCHS, batch_size=cfg.batch_size, lr=0.01),
                              run=RunConfig(device=str(device), out=str(out), progress=False)))
    timed = s["history"][1:]
    return len(timed) / sum(1.0 / h["images_per_s"] for h in timed)  # every epoch trains the same images


def _measure_store(root: Path, cfg: DataBenchConfig, device: torch.device, num_classes: int, work: Path) -> dict:
    """The store's two ratios at the largest worker count, each from interleaved rounds after a warm-up round."""
    from camkd.teachers import load_teachers

    workers = max(cfg.workers)
    ckpts = _teachers(cfg, num_classes, work)
    teachers = load_teachers(ckpts, device=device)
    rounds: dict[str, list[float]] = {}
    for r in range(cfg.repeats + 1):  # the order alternates over the rounds, so neither part always comes first
        rates = {name: _inference_rate(root, cfg, teachers, workers, device) if name == "inference"
                 else _cache(root, cfg, ckpts, workers, device, work / f"store{r}.zarr") for name in _rotated(("inference", "cache"), r)}
        if r > 0:
            for name, rate in rates.items():
                rounds.setdefault(name, []).append(rate)
    store = work / "store0.zarr"
    for r in range(cfg.repeats + 1):
        for method in _rotated(("ce", *METHODS), r):  # each method first in some round
            rate = _distill(root, cfg, store, method, workers, device, work / f"run{r}_{method}")
            if r > 0:
                rounds.setdefault(method, []).append(rate)
    med = {name: statistics.median(v) for name, v in rounds.items()}
    return {"image_size": cfg.store_image_size, "workers": workers, "teachers": list(cfg.teacher_archs),
            "student": cfg.student, "samples_per_s": {k: med[k] for k in ("cache", "inference")},
            "train_images_per_s": {k: med[k] for k in ("ce", *METHODS)}, "rounds": rounds,
            "cache_over_inference": med["cache"] / med["inference"],
            "distill_over_ce": {m: med[m] / med["ce"] for m in METHODS}, "targets": STORE_TARGETS}


def _rotated(names: tuple[str, ...], r: int) -> tuple[str, ...]:
    """``names`` starting at the r-th (mod their number): round r's order of the interleaved parts."""
    k = r % len(names)
    return names[k:] + names[:k]


def _check(cfg: DataBenchConfig) -> None:
    """Refuse settings that cannot run, before any image is written."""
    if cfg.classes > cfg.images:
        raise CamkdError(f"bench data: --classes {cfg.classes} is more than --images {cfg.images}; every class needs an image")
    if not cfg.workers or min(cfg.workers) < 0:
        raise CamkdError(f"bench data: --workers takes counts of 0 or more (repeat the option), got {cfg.workers}")
    if cfg.root is not None and Path(cfg.root).exists() and not Path(cfg.root).is_dir():
        raise CamkdError(f"bench data: --root {cfg.root} is a file; give a folder (the images are written there)")
    if not cfg.teacher_archs:
        raise CamkdError("bench data: give at least one --teacher-arch (the teachers cached in the store parts)")
    from camkd.models import resolve_arch

    for arch in (*cfg.teacher_archs, cfg.student):
        try:
            resolve_arch(arch)
        except CamkdError as e:
            raise CamkdError(f"bench data: {e}") from None


def run_data(cfg: DataBenchConfig) -> dict:
    """Both loaders on the same images: images/s per worker count and camkd's ratio over torchvision's."""
    _check(cfg)
    device = resolve_device(cfg.device)
    before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="camkd-bench-data-") as tmp:
        root = Path(cfg.root) if cfg.root is not None else Path(tmp)
        make_images(root, cfg)
        from camkd.data.listing import list_imagefolder

        listing = list_imagefolder(root, "train")
        torch.set_num_threads(1)
        try:
            rounds = _measure(root, cfg, device, len(listing))
            work = Path(tmp) / "store-parts"  # teachers, stores and runs; never among the images
            work.mkdir()
            store = _measure_store(root, cfg, device, listing.num_classes, work)
        finally:
            torch.set_num_threads(before)
    rates = {w: {name: statistics.median(v) for name, v in r.items()} for w, r in rounds.items()}
    ratios = {w: r["camkd"] / r["torchvision"] for w, r in rates.items()}
    return {"machine": machine(), "device": device_info(device, [1]), "config": asdict(cfg),
            "data": {"images": len(listing), "classes": listing.num_classes, "mean_bytes": float(np.mean(listing.sizes))},
            "images_per_s": rates, "rounds": rounds, "camkd_over_torchvision": ratios, "target": TARGET, "store": store}


def to_markdown(r: dict) -> str:
    m, c, d = r["machine"], r["config"], r["data"]
    lines = [f"Device: {device_text(r['device'])}; {m['cores']} cores; torch {m['torch']}; camkd {m['camkd']}; {m['date']}",
             f"{d['images']} JPEGs ({c['width']}x{c['height']} and {c['height']}x{c['width']}, mean "
             f"{d['mean_bytes'] / 1024:.0f} KiB, {d['classes']} classes) -> RandomResizedCrop {c['image_size']} + flip + "
             f"ImageNet normalization on the device, batch {c['batch_size']}; median of {c['repeats']} interleaved "
             "rounds after a warm-up round.", "",
             "| workers | camkd images/s (rounds' range) | torchvision images/s (range) | camkd / torchvision |",
             "|---|---|---|---|"]
    for w, rate in r["images_per_s"].items():
        ratio, spread = r["camkd_over_torchvision"][w], {k: f"{min(v):.0f}-{max(v):.0f}" for k, v in r["rounds"][w].items()}
        lines.append(f"| {w} | {rate['camkd']:.0f} ({spread['camkd']}) | {rate['torchvision']:.0f} ({spread['torchvision']}) "
                     f"| **{ratio:.2f}x** (target {r['target']}x) |")
    return "\n".join(lines + ["", *_store_markdown(r["store"], c)])


def _store_markdown(s: dict, c: dict) -> list[str]:
    """The store parts' table: cache-teachers against plain inference, distill against ce."""
    span = {k: f"{min(v):.0f}-{max(v):.0f}" for k, v in s["rounds"].items()}
    rates, train, t = s["samples_per_s"], s["train_images_per_s"], s["targets"]
    lines = [f"Store parts on the same JPEGs: RandomResizedCrop **{s['image_size']} px** views (the table above: "
             f"{c['image_size']} px), camkd's loader with {s['workers']} workers, {len(s['teachers'])} random-init teachers "
             f"({', '.join(s['teachers'])}) cached with -f none ({VIEWS} views), student {s['student']}, batch {c['batch_size']}; "
             f"distill rates are epochs 2-{EPOCHS}; median of {c['repeats']} interleaved rounds after a warm-up round.", "",
             "| measured (per s, rounds' range) | against (per s, range) | ratio |", "|---|---|---|",
             f"| cache-teachers {rates['cache']:.0f} samples ({span['cache']}) | plain inference of the same teachers "
             f"{rates['inference']:.0f} ({span['inference']}) | **{s['cache_over_inference']:.3f}** "
             f"(target {t['cache_over_inference']}) |"]
    for m, ratio in s["distill_over_ce"].items():
        lines.append(f"| distill --method {m} {train[m]:.0f} images ({span[m]}) | ce (the student alone) "
                     f"{train['ce']:.0f} ({span['ce']}) | **{ratio:.3f}** (target {t['distill_over_ce']}) |")
    return lines


def plot(r: dict) -> Figure:
    """Images/s per worker count, camkd beside torchvision; the store parts' ratios against their targets."""
    fig, axes = new_figure(1, 2, (11, 4))
    ax = axes[0][0]
    ws = list(r["images_per_s"])
    x = np.arange(len(ws))
    for k, (name, color) in enumerate((("camkd", "tab:blue"), ("torchvision", "gray"))):
        ax.bar(x + (k - 0.5) * 0.38, [r["images_per_s"][w][name] for w in ws], width=0.38, color=color, label=name)
    ax.set_xticks(x, [f"{w} workers" for w in ws])
    ax.set_ylabel(f"training views/s ({r['config']['image_size']} px)")
    ax.legend()
    ax.set_title(device_text(r["device"]), fontsize=9)
    _plot_store(axes[0][1], r["store"])
    return fig


def _plot_store(ax, s: dict) -> None:
    """The store parts' ratios as bars, each target as a tick."""
    t = s["targets"]
    bars = [("cache-teachers / inference", s["cache_over_inference"], t["cache_over_inference"])]
    bars += [(f"distill {m} / ce", v, t["distill_over_ce"]) for m, v in s["distill_over_ce"].items()]
    y = np.arange(len(bars))
    ax.barh(y, [b[1] for b in bars], color="tab:blue")
    ax.scatter([b[2] for b in bars], y, marker="|", s=400, color="black")
    ax.set_yticks(y, [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel(f"ratio ({s['image_size']} px views, {s['workers']} workers; black tick: the target)")
