"""`camkd bench data`: camkd's image-folder loader against torchvision's, side by side on the same JPEGs.

Both deliver model-ready training batches of RandomResizedCrop + horizontal-flip views, normalized with
ImageNet's statistics, on the device:

- camkd: ``FolderDataset.view_batches`` (workers decode, crop and resize with Pillow, hash each uint8 view
  (CRC-32) and send uint8 batches; the batch is normalized on the device by ``views.normalize``);
- torchvision: ``ImageFolder`` + ``DataLoader`` with ``RandomResizedCrop`` / ``RandomHorizontalFlip`` /
  ``ToTensor`` / ``Normalize`` per sample in the workers (float32 batches).

Each pass reads every image once in a seeded order, ``batch_size`` at a time, with the same number of
worker processes (0: the main process). Loaders are made once per worker count with persistent workers
and warmed up by one untimed round, so worker start-up is not timed. Variants run in interleaved rounds
(camkd, torchvision, camkd, ...) and the median images/s of ``repeats`` rounds is reported; the main
process runs torch at one thread (DataLoader workers always do). The images are generated (smooth
colour fields with fine texture, JPEG quality 90, ``width`` x ``height`` and its transpose alternately)
into a temporary folder, or into ``root``; a ``root`` that already holds ``train/`` is measured as it is.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from camkd.bench.common import device_info, device_text, machine, new_figure
from camkd.bench.config import DataBenchConfig
from camkd.device import resolve_device
from camkd.errors import CamkdError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TARGET = 1.3  # camkd's images/s over torchvision's, at every worker count (issue 17)


def make_images(root: Path, cfg: DataBenchConfig) -> None:
    """``cfg.images`` JPEGs in ``root/train/classK/``: smooth random colour fields (bilinear upsampled 8x6 noise)
    plus fine noise, so they compress and decode like photographs rather than like noise or flat colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(cfg.images):
        w, h = (cfg.width, cfg.height) if i % 2 == 0 else (cfg.height, cfg.width)
        coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        a = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, size=(h, w, 3), dtype=np.int16)
        folder = root / "train" / f"class{i % cfg.classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f"img{i:05d}.jpg", quality=cfg.quality)


class _CamkdPass:
    """One pass of camkd's loader: uint8 views from the workers, normalized on the device."""

    def __init__(self, root: Path, cfg: DataBenchConfig, workers: int, device: torch.device) -> None:
        from camkd.data import load_dataset

        self.data = load_dataset("imagefolder", "train", data_dir=root, image_size=cfg.image_size, workers=workers)
        self.spec, self.device, self.batch, self.view = self.data.aug_spec(0), device, cfg.batch_size, 0

    def __call__(self, order: np.ndarray) -> int:
        from camkd.data.views import normalize

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

        from camkd.data.folder import IMAGENET_NORM

        tf = transforms.Compose([transforms.RandomResizedCrop(cfg.image_size), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize(IMAGENET_NORM.mean, IMAGENET_NORM.std)])
        self.folder, self.device, self.batch = datasets.ImageFolder(str(root / "train"), transform=tf), device, cfg.batch_size
        self.order: list[int] = []
        self.loader = DataLoader(self.folder, batch_size=cfg.batch_size, sampler=_Replay(self), num_workers=workers,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def __call__(self, order: np.ndarray) -> int:
        self.order = order.tolist()
        n = 0
        for x, _ in self.loader:
            n += len(x.to(self.device, non_blocking=True))
        return n


class _Replay(torch.utils.data.Sampler):
    """The order the next pass reads (set before each pass, so the loader and its workers stay)."""

    def __init__(self, owner: _TorchvisionPass) -> None:
        self.owner = owner

    def __iter__(self) -> Iterator[int]:
        return iter(self.owner.order)

    def __len__(self) -> int:
        return len(self.owner.order)


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


def _check(cfg: DataBenchConfig) -> None:
    """Refuse settings that cannot run, before any image is written."""
    if cfg.classes > cfg.images:
        raise CamkdError(f"bench data: --classes {cfg.classes} is more than --images {cfg.images}; every class needs an image")
    if not cfg.workers or min(cfg.workers) < 0:
        raise CamkdError(f"bench data: --workers takes counts of 0 or more (repeat the option), got {cfg.workers}")
    if cfg.root is not None and Path(cfg.root).exists() and not Path(cfg.root).is_dir():
        raise CamkdError(f"bench data: --root {cfg.root} is a file; give a folder (the images are written there)")


def run_data(cfg: DataBenchConfig) -> dict:
    """Both loaders on the same images: images/s per worker count and camkd's ratio over torchvision's."""
    _check(cfg)
    device = resolve_device(cfg.device)
    before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="camkd-bench-data-") as tmp:
        root = Path(cfg.root) if cfg.root is not None else Path(tmp)
        if not (root / "train").is_dir():
            make_images(root, cfg)
        from camkd.data.listing import list_imagefolder

        listing = list_imagefolder(root, "train")
        torch.set_num_threads(1)
        try:
            rounds = _measure(root, cfg, device, len(listing))
        finally:
            torch.set_num_threads(before)
    rates = {w: {name: statistics.median(v) for name, v in r.items()} for w, r in rounds.items()}
    ratios = {w: r["camkd"] / r["torchvision"] for w, r in rates.items()}
    return {"machine": machine(), "device": device_info(device, [1]), "config": asdict(cfg),
            "data": {"images": len(listing), "classes": listing.num_classes, "mean_bytes": float(np.mean(listing.sizes))},
            "images_per_s": rates, "rounds": rounds, "camkd_over_torchvision": ratios, "target": TARGET}


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
    return "\n".join(lines)


def plot(r: dict) -> Figure:
    """Images/s per worker count, camkd beside torchvision."""
    fig, axes = new_figure(1, 1, (6, 4))
    ax = axes[0][0]
    ws = list(r["images_per_s"])
    x = np.arange(len(ws))
    for k, (name, color) in enumerate((("camkd", "tab:blue"), ("torchvision", "gray"))):
        ax.bar(x + (k - 0.5) * 0.38, [r["images_per_s"][w][name] for w in ws], width=0.38, color=color, label=name)
    ax.set_xticks(x, [f"{w} workers" for w in ws])
    ax.set_ylabel(f"training views/s ({r['config']['image_size']} px)")
    ax.legend()
    ax.set_title(device_text(r["device"]), fontsize=9)
    return fig
