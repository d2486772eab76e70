"""`camkd bench speed`: throughput ratios, measured interleaved in one process, at each thread count.

For each thread count: a. the student alone (`ce`), the limit, beside a plain PyTorch loop of the same
student, data, crop/flip and SGD (camkd/bench/plain.py: what `ce` itself is measured against); b. distillation from the store,
every method, and for each method with trainable parts of its own (camkd+features' Embeds, fitnet's ConvRegs) the
plain loop plus those parts and its loss on the teachers' outputs held in memory (read once from the same store): that
method's limit, so the cache's cost (`cached_over_limit`) is told apart from the method's own work; c. --online
(teachers re-run each step) for avg and camkd; d. cache-teachers
against the best plain teacher inference (inference_mode, the fastest of several batch sizes);
e. the reader alone; f. bytes per sample-view.

Training throughput is the loop's own figure for **epoch 2**, the first epoch in which every
term of every method runs (CA-MKD skips its feature term in epoch 1, as the reference does);
evaluation is excluded. Variants run in rounds (A B C ... A B C ...), the median is reported.
``--precision`` and ``--channels-last`` go to every run it makes (distill, cache-teachers, the plain loop, the
plain teacher inference, the torchrun rows); the result records the device they ran on.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from camkd.bench.common import device_info, device_text, machine, random_teachers
from camkd.bench.config import SpeedConfig
from camkd.bench.plain import autocast, check_precision, own_parts, plain_images_per_s, store_method, teacher_views
from camkd.cache import CacheConfig, cache_teachers
from camkd.config import DataConfig, LossConfig, OptimConfig, RunConfig
from camkd.data import load_dataset
from camkd.data.augspec import AugSpec
from camkd.data.order import epoch_order
from camkd.data.views import augment
from camkd.device import resolve_device
from camkd.distill import DistillConfig, distill
from camkd.errors import CamkdError
from camkd.methods import required_layers
from camkd.output import new_figure
from camkd.progress import log
from camkd.store import open_store
from camkd.store.reader import FeatureStream
from camkd.teachers import load_teachers, run_teachers

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METHODS = [("kd", None), ("avg", None), ("ebkd", None), ("aekd", None), ("fitnet", None), ("camkd", 0.0), ("camkd", None)]
ONLINE = [("avg", None), ("camkd", None)]
INFER_BATCHES = (32, 64, 128, 256)
PLAIN = "plain"  # the plain PyTorch loop's row (camkd/bench/plain.py)


def _limit(label: str) -> str:
    """The row of the plain loop with method ``label``'s own parts (its limit)."""
    return f"{PLAIN} + {label} parts"


def _label(method: str, beta: float | None) -> str:
    return f"{method}(beta=0)" if beta == 0.0 else ("camkd+features" if method == "camkd" else method)


def _chosen(cfg: SpeedConfig, variants: list[tuple[str, float | None]]) -> list[tuple[str, float | None]]:
    return [v for v in variants if cfg.methods is None or v[0] in cfg.methods]


def run_speed(cfg: SpeedConfig) -> dict:
    known = sorted({m for m, _ in METHODS})
    unknown = [m for m in cfg.methods or [] if m not in known]
    if unknown:
        raise CamkdError(f"bench speed: unknown method {unknown[0]!r}; choose from {', '.join(known)} (ce always runs)")
    check_precision(cfg.precision)
    device = resolve_device(cfg.device)
    work = Path(tempfile.mkdtemp(prefix="camkd-bench-"))
    before = torch.get_num_threads()
    try:
        ckpts = random_teachers(cfg.teacher, cfg.num_teachers, cfg.num_classes, work)
        counts = cfg.threads if device.type == "cpu" else [before]
        results: dict = {"machine": machine(), "device": device_info(device, counts), "config": asdict(cfg), "by_threads": {}}
        if device.type == "cuda":  # "fp32" on CUDA: cuDNN's convolutions in TF32 unless turned off (torch's defaults)
            results["config"]["tf32"] = {"convolutions": torch.backends.cudnn.allow_tf32,
                                         "matmuls": torch.backends.cuda.matmul.allow_tf32}
        for th in counts:
            torch.set_num_threads(th)
            log(f"[bench] {th} thread(s)")
            results["by_threads"][str(th)] = _run(cfg, device, ckpts, work / f"t{th}")
        ranks = cfg.ranks if device.type != "cuda" else [w for w in cfg.ranks if w <= torch.cuda.device_count()]
        if ranks != cfg.ranks:
            log(f"[bench] torchrun rows only up to the {torch.cuda.device_count()} GPU(s) here: W = {ranks}")
        if ranks:
            results["ranks"] = _ranks(cfg, device, work / f"t{counts[0]}" / "store16.zarr", work / "ranks", ranks)
        return results
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(work, ignore_errors=True)


def _inference_rate(teachers, images: torch.Tensor, spec: AugSpec, layers: dict, batch: int, device: torch.device,
                    cfg: SpeedConfig) -> float:
    """Plain teacher inference over the samples (augmentation and the copy to the host included, nothing written),
    at the run's precision and memory format."""
    n = images.shape[0]
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        idx = torch.arange(s, min(s + batch, n))
        x, _ = augment(images, idx, spec, view=0)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, cfg.precision):
            logits, feats = run_teachers(teachers, x, layers)
        logits.to(torch.float16).cpu()
        for per in feats.values():
            for t in per:
                t.to(torch.float16).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def _run(cfg: SpeedConfig, device: torch.device, ckpts: list[str], work: Path) -> dict:
    work.mkdir(parents=True)
    synth = dict(dataset="synthetic", options={"num_samples": cfg.samples, "num_classes": cfg.num_classes})
    train = load_dataset("synthetic", "train", num_samples=cfg.samples, num_classes=cfg.num_classes).to(device)
    out: dict = {}

    # d. cache-teachers against the best plain inference, interleaved
    teachers = load_teachers(ckpts, device=device)
    if cfg.channels_last:
        for t in teachers:
            t.model.to(memory_format=torch.channels_last)
    fast = dict(precision=cfg.precision, channels_last=cfg.channels_last)  # what every run it makes is given
    spec = AugSpec(seed=0, norm=train.norm)
    layers = {"penultimate": -2}
    infer: dict[int, list[float]] = {b: [] for b in INFER_BATCHES}
    cache_rates = []
    for r in range(cfg.repeats):
        for b in INFER_BATCHES:
            infer[b].append(_inference_rate(teachers, train.images, spec, layers, b, device, cfg))
        s = cache_teachers(CacheConfig(teachers=ckpts, **synth, views=1, features=["penultimate"], dtype="float16",
                                       device=str(device), out=str(work / f"store{r}.zarr"), progress=False, evaluate=False,
                                       **fast))
        cache_rates.append(s["samples_per_s"])
    best_b = max(INFER_BATCHES, key=lambda b: statistics.median(infer[b]))
    out["cache"] = {"inference_samples_per_s": {b: statistics.median(v) for b, v in infer.items()},
                    "best_inference_batch": best_b, "best_inference_samples_per_s": statistics.median(infer[best_b]),
                    "cache_samples_per_s": statistics.median(cache_rates)}
    out["cache"]["ratio"] = out["cache"]["cache_samples_per_s"] / out["cache"]["best_inference_samples_per_s"]
    log(f"[bench] cache-teachers {out['cache']['ratio']:.3f} of the best plain inference (batch {best_b})")

    # f. bytes per sample-view; the training store (penultimate and hint 2, float16)
    store_path = work / "store16.zarr"
    s16 = cache_teachers(CacheConfig(teachers=ckpts, **synth, views=2, features=["penultimate", "hint:2"], dtype="float16",
                                     device=str(device), out=str(store_path), progress=False, evaluate=False, **fast))
    s32 = cache_teachers(CacheConfig(teachers=ckpts, **synth, views=1, features=["penultimate", "hint:2"], dtype="float32",
                                     device=str(device), out=str(work / "store32.zarr"), progress=False, evaluate=False,
                                     **fast))
    out["bytes_per_sample_view"] = {"float16": s16["bytes_per_sample_view"], "float32": s32["bytes_per_sample_view"]}

    # e. the reader alone
    out["reader"] = _reader_speed(open_store(store_path), cfg.repeats)

    # a, b, c. training throughput in epoch 2, interleaved rounds (round 0 warms up); the plain loop right after ce,
    # a method's limit (the plain loop with its own parts) right after the method
    store = open_store(store_path)
    owners = [(m, b) for m, b in _chosen(cfg, METHODS)
              if own_parts(store_method(m, LossConfig(beta=b), cfg.student, train, store), epoch=2)]
    layers = tuple(dict.fromkeys(x for m, b in owners for x in required_layers(m, LossConfig(beta=b))))
    held = teacher_views(store, layers, device) if owners else None  # read once, before any timing
    variants = [("ce", None, "cached"), (PLAIN, None, "cached")]
    for m, b in _chosen(cfg, METHODS):
        variants += [(m, b, "cached")] + ([(m, b, "limit")] if (m, b) in owners else [])
    optim = OptimConfig(epochs=2, batch_size=cfg.batch_size, lr=0.01)
    rates: dict[str, list[float]] = {}
    for r in range(cfg.repeats + 1):
        for method, beta, mode in variants + ([(m, b, "online") for m, b in _chosen(cfg, ONLINE)] if cfg.online and r == 1 else []):
            online = mode == "online"
            name = _limit(_label(method, beta)) if mode == "limit" else ("online " if online else "") + _label(method, beta)
            if method == PLAIN:  # the same samples, batch, epochs and SGD as ce's run; epoch 2's rate
                rate = plain_images_per_s(cfg.student, train, batch_size=cfg.batch_size, optim=optim, **fast)[-1]
            elif mode == "limit":  # the same, plus the method's parts (built afresh, as each distill run builds them)
                parts = store_method(method, LossConfig(beta=beta), cfg.student, train, store)
                rate = plain_images_per_s(cfg.student, train, batch_size=cfg.batch_size, optim=optim, method=parts,
                                          teachers=held, **fast)[-1]
            else:
                run_dir = work / f"run_{r}_{name.replace(' ', '_')}"
                s = distill(DistillConfig(arch=cfg.student, method=method, cache=str(store_path), online=online,
                                          teachers=ckpts if online else [], loss=LossConfig(beta=beta),
                                          data=DataConfig(dataset=None), optim=optim,
                                          run=RunConfig(device=str(device), out=str(run_dir), progress=False, **fast)))
                rate = s["history"][-1]["images_per_s"]
                shutil.rmtree(run_dir, ignore_errors=True)
            if r > 0:
                rates.setdefault(name, []).append(rate)
        log(f"[bench] training round {r}/{cfg.repeats} done")
    med = {k: statistics.median(v) for k, v in rates.items()}
    out["train_images_per_s"] = med
    out["ce_over_plain"] = med["ce"] / med[PLAIN]
    out["rounds"] = {"ce": rates["ce"], PLAIN: rates[PLAIN]}  # the pair's every timed round
    log(f"[bench] ce {out['ce_over_plain']:.3f} of the plain PyTorch loop")
    limits = {_limit(_label(m, b)) for m, b in owners}
    out["cached_over_ce"] = {k: v / med["ce"] for k, v in med.items()
                             if k not in ("ce", PLAIN) and k not in limits and not k.startswith("online ")}
    out["cached_over_limit"] = {_label(m, b): med[_label(m, b)] / med[_limit(_label(m, b))] for m, b in owners}
    for k, v in out["cached_over_limit"].items():
        log(f"[bench] {k} from the store {v:.3f} of the plain loop with its own parts")
    out["cached_over_online"] = {k: med[k] / med["online " + k] for k in out["cached_over_ce"] if "online " + k in med}
    out["targets"] = {"ce_over_plain": 0.98, "logit_methods_over_ce": 0.95, "camkd_features_over_ce": 0.85,
                      "cache_over_inference": 0.90}
    return out


def _ranks(cfg: SpeedConfig, device: torch.device, store: Path, work: Path, ranks: list[int]) -> dict:
    """Epoch-2 throughput of `camkd distill` under torchrun with W processes (one thread each), W in ``ranks``
    (on CUDA one GPU per process).

    Every W runs as a fresh torchrun job (start-up excluded: the figure is the loop's own), so W = 1
    pays the same process costs. On a CPU the ranks share the machine's cores.
    """
    out: dict = {}
    for method, beta in (("ce", None), ("camkd", None)):
        name = _label(method, beta)
        for w in ranks:
            rates = []
            for r in range(cfg.repeats):
                run_dir = work / f"{name}_w{w}_{r}"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(w),
                       "-m", "camkd.cli", "distill", "-m", cfg.student, "-c", str(store), "--method", method,
                       "--epochs", "2", "--batch-size", str(cfg.batch_size), "--lr", "0.01", "--device", str(device.type),
                       "--out", str(run_dir), "-q", *_fast_options(cfg)]
                env = dict(os.environ, OMP_NUM_THREADS="1")
                p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if p.returncode != 0:
                    raise CamkdError(f"bench: torchrun with {w} ranks failed: {p.stderr.strip().splitlines()[-1:]}")
                rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
                rates.append(rec["images_per_s"])
            out.setdefault(name, {})[str(w)] = statistics.median(rates)
        log(f"[bench] {name} under torchrun: " + ", ".join(f"W={w} {v:.0f} img/s" for w, v in out[name].items()))
    return out


def _fast_options(cfg: SpeedConfig) -> list[str]:
    """--precision and --channels-last for a `camkd distill` command line (only those that differ from the default)."""
    return (["--precision", cfg.precision] if cfg.precision != "fp32" else []) + (["--channels-last"] if cfg.channels_last else [])


def _reader_speed(store, repeats: int) -> dict:
    t_logit, t_feat, t_stream = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lg = store.logits(0)
        t_logit.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        feats = store.features("penultimate", 0)
        t_feat.append(time.perf_counter() - t0)
        windows = epoch_order(store.n, seed=0, epoch=1, block_rows=store.block_rows, window_blocks=1)
        t0 = time.perf_counter()
        for _ in FeatureStream(store, ("penultimate",), 0, windows):
            pass
        t_stream.append(time.perf_counter() - t0)
    fbytes, lbytes, n = sum(f.nbytes for f in feats), lg.numel() * lg.element_size(), store.n

    def rate(times: list[float], nbytes: int) -> dict:
        t = statistics.median(times)
        return {"samples_per_s": n / t, "MB_per_s": nbytes / 2**20 / t}

    return {"logits_whole_view": rate(t_logit, lbytes), "features_whole_view": rate(t_feat, fbytes),
            "features_streamed": rate(t_stream, fbytes)}


def _tf32_text(tf32: dict | None) -> str:
    """How float32 ran on CUDA: TF32 (10 mantissa bits) in convolutions and/or matmuls, or full float32."""
    if not tf32:
        return ""
    on = [k for k, v in tf32.items() if v]
    return f" (TF32 in {' and '.join(on)}; {', '.join(k for k in tf32 if k not in on) or 'nothing'} in full float32)" \
        if on else " (no TF32: full float32)"


def to_markdown(r: dict) -> str:
    m, c = r["machine"], r["config"]
    lines = [f"Device: {device_text(r['device'])}; {m['cores']} cores; torch {m['torch']}; camkd {m['camkd']}; {m['date']}",
             f"Precision {c.get('precision', 'fp32')}{_tf32_text(c.get('tf32'))}, channels-last "
             f"{'on' if c.get('channels_last') else 'off'} (every run).",
             f"Student {c['student']}, {c['num_teachers']} x {c['teacher']} teachers, {c['samples']} synthetic "
             f"{c['num_classes']}-class 32x32 samples, batch {c['batch_size']}; training rates are epoch 2 (every term "
             f"of every method runs), median of {c['repeats']} interleaved rounds (online: 1 round)."]
    for th, t in r["by_threads"].items():
        med = t["train_images_per_s"]
        lines += ["", f"**{th} thread(s)**", "", "| variant | train images/s | / ce (the limit) | cached / online |",
                  "|---|---|---|---|", f"| ce (the limit) | {med['ce']:.0f} | 1.000 | |"]
        if PLAIN in med:
            lines.append(f"| plain PyTorch loop | {med[PLAIN]:.0f} | {med[PLAIN] / med['ce']:.3f} | |")
        for k, ratio in t["cached_over_ce"].items():
            online = t["cached_over_online"].get(k)
            lines.append(f"| {k} | {med[k]:.0f} | {ratio:.3f} | {f'{online:.2f}x' if online else ''} |")
            if _limit(k) in med:
                lines.append(f"| plain loop + {k}'s own parts | {med[_limit(k)]:.0f} | {med[_limit(k)] / med['ce']:.3f} | |")
        for k, v in med.items():
            if k.startswith("online "):
                lines.append(f"| {k} | {v:.1f} | {v / med['ce']:.3f} | |")
        if "ce_over_plain" in t:
            lines += ["", f"ce / plain PyTorch loop: **{t['ce_over_plain']:.3f}** (target 0.98; the same student, samples, "
                          "batch, crop/flip and SGD, epoch 2, interleaved)"]
        for k, v in t.get("cached_over_limit", {}).items():
            lines += ["", f"{k} from the store: **{v:.3f}** of the plain loop with its own parts (the cache's cost), "
                          f"{t['cached_over_ce'][k]:.3f} of ce"]
        ca = t["cache"]
        per_b = ", ".join(f"{b}: {v:.1f}" for b, v in ca["inference_samples_per_s"].items())
        lines += ["", f"cache-teachers {ca['cache_samples_per_s']:.1f} samples/s vs the best plain inference "
                      f"{ca['best_inference_samples_per_s']:.1f} (batch {ca['best_inference_batch']}; by batch {per_b}): "
                      f"ratio **{ca['ratio']:.3f}** (target 0.90)", "", "| reader | samples/s | MB/s |", "|---|---|---|"]
        for k, v in t["reader"].items():
            lines.append(f"| {k} | {v['samples_per_s']:.0f} | {v['MB_per_s']:.0f} |")
    if r.get("ranks"):
        ws = list(next(iter(r["ranks"].values())))
        lines += ["", "**torchrun, one thread per rank** (epoch-2 images/s of the whole job; the ranks share this "
                      "machine's cores)", "", "| variant | " + " | ".join(f"W={w}" for w in ws) + " |",
                  "|---|" + "---|" * len(ws)]
        for name, by_w in r["ranks"].items():
            lines.append(f"| {name} | " + " | ".join(f"{by_w[w]:.0f}" for w in ws) + " |")
    first = next(iter(r["by_threads"].values()))["bytes_per_sample_view"]
    lines += ["", "| array | bytes per sample-view, float16 | float32 |", "|---|---|---|"]
    for k, v in first["float16"].items():
        lines.append(f"| {k} | {v:.0f} | {first['float32'].get(k, float('nan')):.0f} |")
    return "\n".join(lines)


def plot(r: dict) -> Figure:
    """Training throughput bars per thread count: the limit, cached and online."""
    runs = list(r["by_threads"].items())
    fig, axes = new_figure(1, len(runs), (6 * len(runs), 4.5))
    for ax, (th, t) in zip(axes[0], runs):
        med = t["train_images_per_s"]
        names = list(med)
        colors = ["gray" if n in ("ce", PLAIN) or n.startswith(f"{PLAIN} + ")
                  else ("tab:red" if n.startswith("online ") else "tab:blue") for n in names]
        ax.barh(names, [med[n] for n in names], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("training images/s, epoch 2")
        ax.set_title(f"{th} thread(s)")
    fig.suptitle(f"{r['config']['student']} from {r['config']['num_teachers']} x {r['config']['teacher']} on "
                 f"{device_text(r['device'])}\n(gray: alone, or plain with a method's parts; blue: store, red: --online)", fontsize=10)
    return fig
