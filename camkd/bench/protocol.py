"""`camkd bench protocol`: the reference protocol's wall-clock time, projected from short measurements.

The protocol is CA-MKD's on CIFAR-100: 3 x resnet32x4 teachers -> vgg8, 240 epochs of batch 64 over 50,000
images. camkd's way caches the teachers once per view (240 views, one per epoch) and distills from the store;
the reference's way (`--online`) re-runs the teachers at every step. Measured here, on CIFAR-100-shaped
synthetic data and random-weight teachers (speed depends on neither the pixels nor the weights):

1. caching: `cache-teachers` over ``cache_views`` whole views -> samples/s (the run's own figure);
2. distillation, from that store and ``--online``: a warm-up run of ``warmup_steps`` steps of epoch 1
   (checkpointed), then ``--resume`` into epoch 2, where every term of CA-MKD runs, for ``steps`` steps (a
   fraction of the epoch, extrapolated to the whole epoch; None: the whole epoch) -> images/s (the loop's own
   figure, which counts the epoch's start, so a fraction errs high);
3. one evaluation of the student on ``test_samples`` images, which every epoch of both ways also makes.

Projected: camkd = views x samples / caching rate + epochs x (trained images / from-store rate + evaluation);
the reference = epochs x (trained images / online rate + evaluation). Start-up, data loading and checkpoints
are not counted. The store's files are dropped from the page cache before the timed epoch
(``posix_fadvise(DONTNEED)``, no privileges needed), so the from-store rate reads the disk as the protocol's
store would (its features are far larger than memory). The store's bytes per sample-view give the protocol's
store size for each choice of feature dtype, and how many views of each fit the free space where it runs.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from camkd.bench.common import device_info, device_text, machine, random_teachers
from camkd.bench.config import ReferenceProtocolConfig
from camkd.bench.plain import check_precision
from camkd.cache import CacheConfig, cache_teachers
from camkd.config import DataConfig, LossConfig, OptimConfig, RunConfig
from camkd.data import load_dataset
from camkd.device import resolve_device
from camkd.distill import DistillConfig, distill
from camkd.errors import CamkdError
from camkd.evaluate import evaluate
from camkd.job import Hooks
from camkd.methods import METHODS, required_layers
from camkd.models import create_model, resolve_arch
from camkd.output import new_figure
from camkd.precision import Precision
from camkd.progress import log
from camkd.store import layout, open_store
from camkd.store.sizes import array_sizes, bytes_per_sample_view
from camkd.words import human, plural

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TARGET_S = 15 * 60  # the whole protocol, camkd's way, on one H100 (issue 18)


def _check(cfg: ReferenceProtocolConfig) -> None:
    check_precision(cfg.precision)
    for arch in (cfg.student, cfg.teacher):
        resolve_arch(arch)
    METHODS.resolve(cfg.method)
    if cfg.batch_size > cfg.samples:
        raise CamkdError(f"bench protocol: --batch-size {cfg.batch_size} is larger than --samples {cfg.samples}")
    for name in ("samples", "test_samples", "batch_size", "epochs", "views", "cache_views", "num_teachers", "warmup_steps"):
        if getattr(cfg, name) < 1:
            raise CamkdError(f"bench protocol: {name.replace('_', '-')} must be at least 1")
    if cfg.steps is not None and cfg.steps < 1:
        raise CamkdError("bench protocol: --steps must be at least 1")


def run_protocol(cfg: ReferenceProtocolConfig) -> dict:
    _check(cfg)
    device = resolve_device(cfg.device)
    work = Path(tempfile.mkdtemp(prefix="camkd-protocol-"))
    fast = dict(precision=cfg.precision, channels_last=cfg.channels_last)
    try:
        ckpts = random_teachers(cfg.teacher, cfg.num_teachers, cfg.num_classes, work)
        store = work / "store.zarr"
        features = [layout.layer_option(x) for x in required_layers(cfg.method, LossConfig())] or ["none"]
        log(f"[protocol] caching {cfg.cache_views} view(s) of {cfg.samples} samples with {cfg.num_teachers} x {cfg.teacher}")
        s = cache_teachers(CacheConfig(teachers=ckpts, dataset="synthetic", views=cfg.cache_views, features=features,
                                       options={"num_samples": cfg.samples, "num_classes": cfg.num_classes},
                                       device=str(device), out=str(store), progress=False, evaluate=False, **fast))
        steps_per_epoch = cfg.samples // cfg.batch_size  # drop-last batches
        timed = steps_per_epoch if cfg.steps is None else min(cfg.steps, steps_per_epoch)
        rates = {}
        for online in (False, True):
            name = "online" if online else "store"
            log(f"[protocol] {cfg.method} {'--online' if online else 'from the store'}: {timed} of {steps_per_epoch} "
                "steps of epoch 2")
            rates[name] = _epoch2_rate(cfg, device, store, ckpts if online else [], timed, work / name, fast)
        eval_s = _evaluation_seconds(cfg, device)
        disk = _disk_fit(cfg, store, Path.cwd())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    trained = steps_per_epoch * cfg.batch_size
    cache_s = cfg.views * cfg.samples / s["samples_per_s"]
    epoch_store = trained / rates["store"] + eval_s
    epoch_online = trained / rates["online"] + eval_s
    camkd_total = cache_s + cfg.epochs * epoch_store
    reference_total = cfg.epochs * epoch_online
    return {
        "machine": machine(), "device": device_info(device, [torch.get_num_threads()]), "config": asdict(cfg),
        "measured": {"cache_samples_per_s": s["samples_per_s"], "cache_views": cfg.cache_views,
                     "store_images_per_s": rates["store"], "online_images_per_s": rates["online"],
                     "evaluation_seconds": eval_s, "timed_steps": timed, "steps_per_epoch": steps_per_epoch,
                     "extrapolated": timed < steps_per_epoch},
        "projected_seconds": {"cache_all_views": cache_s, "store_epoch": epoch_store, "online_epoch": epoch_online,
                              "distill_all_epochs": cfg.epochs * epoch_store, "camkd_total": camkd_total,
                              "reference_total": reference_total},
        "reference_over_camkd": reference_total / camkd_total,
        "disk": disk,
        "target_seconds": TARGET_S,
    }


def _epoch2_rate(cfg: ReferenceProtocolConfig, device: torch.device, store: Path, teachers: list[str], steps: int,
                 out: Path, fast: dict) -> float:
    """Images/s of ``steps`` steps of epoch 2 (after a checkpointed warm-up in epoch 1), from the store or online."""
    def run(epochs: int, max_steps: int, resume: bool) -> dict:
        return distill(DistillConfig(arch=cfg.student, method=cfg.method, cache=str(store), online=bool(teachers),
                                     teachers=teachers, data=DataConfig(dataset=None),
                                     optim=OptimConfig(epochs=epochs, batch_size=cfg.batch_size),
                                     run=RunConfig(device=str(device), out=str(out), resume=resume, progress=False, **fast)),
                       hooks=Hooks(max_steps=max_steps))

    run(1, cfg.warmup_steps, False)
    if not teachers:
        drop_page_cache(store)  # the timed epoch reads the store from the disk, as the protocol's would
    s = run(2, steps, True)
    record = s["history"][-1]
    if record["epoch"] != 2:
        raise CamkdError(f"bench protocol: expected an epoch-2 record, got epoch {record['epoch']}")
    return record["images_per_s"]


def drop_page_cache(path: Path) -> int:
    """Ask the kernel to drop every file under ``path`` from the page cache (clean pages go; nothing needs root), so
    what reads them next reads the disk; returns how many files. Where posix_fadvise is missing: nothing, 0."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    n = 0
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def _disk_fit(cfg: ReferenceProtocolConfig, store: Path, where: Path) -> dict:
    """The protocol's store (``cfg.views`` views of ``cfg.samples``) from the measured store's bytes per sample-view:
    as measured, with int8 features (half of float16's bytes, plus a float32 scale per sample and map), and with
    logits only (``-f none``: every method but CA-MKD's feature term and FitNet); each with the views that fit the
    free space of ``where`` (the disk the command ran on)."""
    st = open_store(store)
    per = bytes_per_sample_view(st.g, array_sizes(st.g), st.n, st.views)
    features = sum(v for k, v in per.items() if k.startswith("features/") and not k.endswith("_scale"))
    rest = sum(per.values()) - features
    measured = st.description.feature_dtype
    half = features / 2 if measured == "float16" else features / 4 if measured == "float32" else features
    options = {f"features {measured}": rest + features, "features int8": rest + half + 4 * cfg.num_teachers,
               "logits only (-f none)": rest}
    free = shutil.disk_usage(where).free
    return {"where": str(where), "free_bytes": free, "options": {
        name: {"bytes_per_sample_view": b, "protocol_bytes": b * cfg.samples * cfg.views,
               "views_that_fit": int(free // max(b * cfg.samples, 1))} for name, b in options.items()}}


def _evaluation_seconds(cfg: ReferenceProtocolConfig, device: torch.device) -> float:
    """One evaluation of a fresh student on ``test_samples`` images at the run's precision and memory format (the
    second of two: the first warms up)."""
    test = load_dataset("synthetic", "test", num_samples=cfg.test_samples, num_classes=cfg.num_classes).to(device)
    torch.manual_seed(0)
    precision = Precision.of(cfg.precision, device, channels_last=cfg.channels_last)
    model = precision.to_memory_format(create_model(cfg.student, num_classes=cfg.num_classes, in_channels=3).to(device))
    evaluate(model, test, precision=precision)
    t0 = time.perf_counter()
    evaluate(model, test, precision=precision)  # reads its counts from the device: the time includes the device's work
    return time.perf_counter() - t0


def hms(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    if not math.isfinite(seconds):
        return str(seconds)
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def to_markdown(r: dict) -> str:
    c, m, me, p = r["config"], r["machine"], r["measured"], r["projected_seconds"]
    k = f"{c['num_teachers']} x {c['teacher']}"
    timed = (f"{me['timed_steps']} of the {me['steps_per_epoch']} steps of epoch 2 were timed and **extrapolated** to "
             "the whole epoch" if me["extrapolated"] else f"the whole of epoch 2 ({plural(me['steps_per_epoch'], 'step')}) was timed")
    target = (f"target: under {r['target_seconds'] // 60} min on one H100"
              + ("" if r["device"]["type"] == "cuda" else "; this is not a GPU figure"))
    return "\n".join([
        f"Device: {device_text(r['device'])}; {m['cores']} cores; torch {m['torch']}; camkd {m['camkd']}; {m['date']}",
        f"Precision {c['precision']}, channels-last {'on' if c['channels_last'] else 'off'}.",
        f"The reference protocol, projected: {k} teachers (random weights) -> {c['student']} ({c['method']}), "
        f"{c['samples']} CIFAR-100-shaped synthetic samples ({c['num_classes']} classes), batch {c['batch_size']}, "
        f"{c['epochs']} epochs, {c['views']} cached views. Caching was timed over {c['cache_views']} whole view(s); "
        f"{timed}; one evaluation on {c['test_samples']} images is added to every epoch. Start-up, data loading and "
        "checkpoints are not counted.",
        "",
        "| part | measured | projected |",
        "|---|---|---|",
        f"| cache-teachers, {k} | {me['cache_samples_per_s']:.0f} samples/s | {c['views']} views: {hms(p['cache_all_views'])} |",
        f"| {c['method']} from the store | {me['store_images_per_s']:.0f} images/s | {c['epochs']} epochs: "
        f"{hms(p['distill_all_epochs'])} ({p['store_epoch']:.1f} s each) |",
        f"| evaluation, {c['test_samples']} images | {me['evaluation_seconds']:.2f} s | (in each epoch above and below) |",
        f"| **camkd's way: cache, then distill from the store** | | **{hms(p['camkd_total'])}** ({target}) |",
        f"| the reference's way: {c['method']} --online (teachers re-run each step) | {me['online_images_per_s']:.0f} "
        f"images/s | **{hms(p['reference_total'])}** ({p['online_epoch']:.1f} s per epoch) |",
        "",
        f"The reference's way takes **{r['reference_over_camkd']:.2f}x** camkd's way.",
        *_disk_lines(r.get("disk"), c),
    ])


def _disk_lines(disk: dict | None, c: dict) -> list[str]:
    """What the protocol's store would take, and how many views of it fit where the command ran."""
    if not disk:
        return []
    lines = ["", f"The protocol's store ({c['views']} views of {c['samples']} samples) against the "
                 f"{human(disk['free_bytes'])} free at {disk['where']}:", "",
             "| store | per sample-view | whole protocol | views that fit |", "|---|---|---|---|"]
    for name, o in disk["options"].items():
        fits = "all" if o["views_that_fit"] >= c["views"] else str(o["views_that_fit"])
        lines.append(f"| {name} | {human(o['bytes_per_sample_view'])} | {human(o['protocol_bytes'])} | {fits} |")
    return lines


def plot(r: dict) -> Figure:
    """The two ways' projected hours, camkd's split into caching and distillation."""
    p = r["projected_seconds"]
    fig, axes = new_figure(1, 1, (7, 2.6))
    ax = axes[0][0]
    ax.barh(["camkd (store)"], [p["cache_all_views"] / 3600], color="tab:orange", label="cache-teachers")
    ax.barh(["camkd (store)"], [p["distill_all_epochs"] / 3600], left=[p["cache_all_views"] / 3600], color="tab:blue",
            label="distill from the store")
    ax.barh(["reference (--online)"], [p["reference_total"] / 3600], color="tab:red", label="distill --online")
    ax.invert_yaxis()
    ax.set_xlabel("projected hours, whole protocol")
    ax.legend(fontsize=8)
    c = r["config"]
    ax.set_title(f"{c['num_teachers']} x {c['teacher']} -> {c['student']}, {c['samples']:,} samples, {c['views']} views + "
                 f"{c['epochs']} epochs, {c['precision']}, on {device_text(r['device'])}", fontsize=9)
    return fig
