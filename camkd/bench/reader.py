"""`camkd bench reader`: streamed features (FeatureStream through the store source, as distill reads a view that
exceeds its memory budget, each batch's rows gathered as the step gathers them, in the stored type: the step's cast
to float32 is left out, as the whole view's) beside plain zarr's whole-view reads of the same arrays, on the user's
own store and disk, in interleaved rounds; and the rate a student step of ``images_per_s`` needs. On a GPU the
streamed rows end on the device (copied from pinned memory, gathered there, synchronized at the end of a round).

Also the host side alone: the streamed windows without the per-batch gather (and, for int8, its dequantization),
which is the part a GPU run leaves to the host (decoding blocks into buffers, cutting the plan's rows, queueing the
copies); on a CPU the gather runs on the CPU too and the end-to-end rate includes it."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import zarr

from camkd.bench.common import device_info, machine
from camkd.device import resolve_device
from camkd.epoch_plan import EpochPlan
from camkd.output import new_figure
from camkd.sources import StoreTeachers
from camkd.store import layout, open_store


@dataclass
class ReaderConfig:
    cache: str
    view: int = 0
    window_blocks: int = 4
    batch_size: int = 64
    rounds: int = 5
    seconds: float = 30.0  # rounds stop early past this (the command takes a minute at most)
    threads: int = 1
    images_per_s: float | None = None
    device: str = "auto"


def _arrays(store, layers) -> list[str]:
    return [p for layer in layers for t in range(store.num_teachers)
            for p in [layout.feature_path(layer, t)] + ([layout.scale_path(layer, t)] if store.feature_dtype == "int8" else [])]


def run_reader(cfg: ReaderConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    store = open_store(cfg.cache)
    layers = tuple(store.layers)
    view = cfg.view % store.views
    plain_group = zarr.open_group(str(store.path), mode="r")
    names = _arrays(store, layers)
    nbytes = sum(int(np.prod(plain_group[name].shape[1:])) * plain_group[name].dtype.itemsize for name in names)
    src = StoreTeachers(store, layers, device, memory_budget_mb=0, window_blocks=cfg.window_blocks)
    plan = EpochPlan.of(store.n, seed=0, epoch=view + 1, views=store.views, batch_size=cfg.batch_size, drop_last=False,
                        block_rows=store.block_rows, window_blocks=src.window_blocks)

    def plain() -> float:
        t0 = time.perf_counter()
        for name in names:
            plain_group[name][view]
        return time.perf_counter() - t0

    def streamed() -> float:
        t0 = time.perf_counter()
        for data in src.batches(plan):  # each batch's rows gathered as the step gathers them (in the stored type)
            for per in data.values():
                for rows in per:
                    rows.gather()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def host() -> float:
        t0 = time.perf_counter()
        for _ in src.batches(plan):  # the windows decoded and cut, no gather: what a GPU run leaves to the host
            pass
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    plain(), streamed(), host()  # warm-up: the page cache, the view's logits, the buffers
    times: dict[str, list[float]] = {"plain": [], "streamed": [], "host": []}
    start = time.perf_counter()
    for _ in range(cfg.rounds):
        times["plain"].append(plain())
        times["streamed"].append(streamed())
        times["host"].append(host())
        if time.perf_counter() - start > cfg.seconds:
            break
    rate = {k: nbytes / 2**20 / statistics.median(v) for k, v in times.items()}
    per_sample = nbytes / store.n
    out = {"machine": machine(), "device": device_info(device, [cfg.threads]), "config": asdict(cfg),
           "store": {"path": str(store.path), "n": store.n, "view": view, "layers": list(layers), "teachers": store.num_teachers,
                     "feature_dtype": store.feature_dtype, "block_rows": store.block_rows,
                     "bytes_per_sample_view": per_sample, "view_MB": nbytes / 2**20},
           "rounds": len(times["plain"]), "plain_zarr_MB_per_s": rate["plain"], "streamed_MB_per_s": rate["streamed"],
           "ratio": rate["streamed"] / rate["plain"], "host_side_MB_per_s": rate["host"],
           "host_side_ratio": rate["host"] / rate["plain"]}
    if cfg.images_per_s is not None:
        out["needed_MB_per_s"] = per_sample * cfg.images_per_s / 2**20
    return out


def to_markdown(r: dict) -> str:
    m, s, d = r["machine"], r["store"], r["device"]
    lines = [f"Store {s['path']}: {s['n']} samples, view {s['view']}, {s['teachers']} teachers, features "
             f"{', '.join(s['layers'])} ({s['feature_dtype']}), {s['bytes_per_sample_view']:,.0f} bytes per sample-view "
             f"({s['view_MB']:.1f} MB per view); device {d['type']}, {d['cpu']}, {d['threads'][0]} thread(s); camkd "
             f"{m['camkd']}, {m['date']}; median of {r['rounds']} interleaved rounds.",
             "", "| read | MB/s |", "|---|---|",
             f"| plain zarr, whole view | {r['plain_zarr_MB_per_s']:.0f} |",
             f"| streamed (as distill reads it) | {r['streamed_MB_per_s']:.0f} |",
             f"| ratio streamed / plain | **{r['ratio']:.3f}** |",
             f"| host side only (no per-batch gather: a GPU run's host work) | {r['host_side_MB_per_s']:.0f} |",
             f"| ratio host side / plain | {r['host_side_ratio']:.3f} |"]
    if "needed_MB_per_s" in r:
        lines.append(f"| needed at {r['config']['images_per_s']:,.0f} images/s | {r['needed_MB_per_s']:.0f} |")
    return "\n".join(lines)


def plot(r: dict):
    fig, ax = new_figure(1, 1, (5, 3))
    keys = ["plain_zarr_MB_per_s", "streamed_MB_per_s"] + (["needed_MB_per_s"] if "needed_MB_per_s" in r else [])
    ax[0, 0].bar(["plain zarr", "streamed", "needed"][: len(keys)], [r[k] for k in keys])
    ax[0, 0].set_ylabel("MB/s")
    ax[0, 0].set_title(f"reader: streamed / plain = {r['ratio']:.3f}")
    return fig
