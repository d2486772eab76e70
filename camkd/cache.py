"""`camkd cache-teachers` and `camkd cache-verify -t`: the teachers' side of the store.

The store (camkd.store) runs no model code: this module loads the teachers and the data, measures
the teachers' test accuracy, and hands the teachers to the store's writer and verifier as a
:class:`~camkd.store.runner.TeacherRunner`. It also writes the end-of-run report, which names the
methods (from their registry) a store can serve.
"""

from __future__ import annotations

from pathlib import Path

import torch

from camkd import dist
from camkd.config import LossConfig
from camkd.data import DataSplit, load_split
from camkd.device import resolve_device
from camkd.evaluate import evaluate
from camkd.memory import check_batch_memory
from camkd.methods import list_methods, required_layers
from camkd.precision import Precision
from camkd.progress import Bar, log
from camkd.store import layout
from camkd.store.config import CacheConfig, batch_size_for, check_options
from camkd.store.location import parse_location
from camkd.store.sizes import human, per_sample_view_text
from camkd.store.verify import SAMPLE, VerifyReport, verify_store
from camkd.store.writer import write_store
from camkd.teachers import Teacher, feature_shapes, fit_teachers, keep_rows, load_teachers, runner
from camkd.words import plural

__all__ = ["CacheConfig", "cache_teachers", "cache_verify", "format_cache_summary"]


def cache_teachers(cfg: CacheConfig) -> dict:
    """Load the teachers and the training data, then write (or continue, or extend) the store; returns a summary."""
    layers = check_options(cfg)
    device = dist.device_for(resolve_device(cfg.device))
    precision = Precision.of(cfg.precision, device, channels_last=cfg.channels_last)  # refused before any work
    world = dist.init(device)
    batch = batch_size_for(cfg, device)
    with dist.agree("loading the teachers and the data"):
        # one teacher twice is refused for a new store; a store that exists fixes its teachers already (one made
        # before the check, from alike trials, stays extendable: its identity is compared instead)
        new = cfg.overwrite or not parse_location(cfg.out).exists()
        teachers = load_teachers(cfg.teachers, device=device, distinct=new)
        train = _load(cfg, "train", device)
        fit_teachers(teachers, train, say=log if cfg.progress and world.main else None)
        check_batch_memory(device, train, batch, infer=[t.model for t in teachers], precision=cfg.precision)
        shapes = feature_shapes(teachers, train, layers, device)
    return write_store(cfg, runner(teachers, device, precision), train, layers, shapes, batch, world,
                       lambda: teacher_test_accuracy(cfg, teachers, device, batch, world, precision))


def _load(cfg: CacheConfig, split: str, device: torch.device) -> DataSplit:
    return load_split(cfg.dataset, split, device=device, data_dir=cfg.data_dir, download=cfg.download, limit=cfg.limit,
                      **cfg.options)


def teacher_test_accuracy(cfg: CacheConfig, teachers: list[Teacher], device: torch.device, batch: int,
                          world: dist.World, precision: Precision | None = None) -> list[float] | None:
    """Each teacher's top-1 on the test split (recorded in the store) in the caching ``precision``, or None with
    evaluate=False.
    Under torchrun each rank evaluates a disjoint slice and the counts are summed; the main rank says so once."""
    if not cfg.evaluate:
        return None
    with dist.agree("loading the test split"):
        test = _load(cfg, "test", device)
    show = cfg.progress and world.main
    if show:
        log(f"evaluating {plural(len(teachers), 'teacher')} on the {test.name} test split ({plural(len(test), 'image')}; "
            "--no-eval skips this)")
    if world.active:
        test = test.subset(len(test) * world.rank // world.size, len(test) * (world.rank + 1) // world.size)
    out = []
    with Bar("evaluating", len(teachers) * len(test), enabled=show) as bar:
        for t, teacher in enumerate(teachers):
            out.append(evaluate(teacher.model, test, batch_size=batch, precision=precision)["top1"])
            bar.update(len(test), f"teacher {t + 1}/{len(teachers)}")
    if show:
        log("teacher test top-1 (%): " + " / ".join(f"{a:.2f}{_published(t)}" for a, t in zip(out, teachers)))
    return out


def _published(t: Teacher) -> str:
    """The top-1 a named teacher's library publishes, to show beside the measured one (over ImageNet-1k's classes)."""
    if t.published_accuracy is None:
        return ""
    return f" (published {t.published_accuracy:.2f}" + (" on ImageNet-1k)" if t.class_rows is not None else ")")


def cache_verify(path: str | Path, teachers: list[str] | None = None, *, sample: int = SAMPLE, seed: int = 0,
                 data_dir: str | None = None, device: str = "auto", repair: bool = False) -> VerifyReport:
    """Check a store (store/verify.py); with ``teachers`` (checkpoint specs, in the store's order) also recompute
    ``sample`` random (view, index) pairs, in the precision and layout the store records for them. The teachers are
    loaded only once the checksums pass."""
    def load():
        from camkd.store import open_store

        dev = resolve_device(device)
        stored = open_store(path).description
        name, channels_last = stored.precision, stored.channels_last
        precision = Precision.of(name, dev, channels_last=channels_last)
        loaded = load_teachers(teachers, device=dev, distinct=False)  # checks a store made before
        for t, record in zip(loaded, stored.teachers):  # restricted to the classes the store kept (classmap.py)
            if record.class_rows is not None and t.class_rows is None and t.num_classes != record.num_classes:
                keep_rows(t, list(record.class_rows))
        return runner(loaded, dev, precision)

    return verify_store(path, load if teachers else None, sample=sample, seed=seed, data_dir=data_dir, repair=repair)


def servable_methods(layers: list[str] | set[str]) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """Methods (with their default options) a store with these feature layers can serve, and what the others lack."""
    ok, missing = [], {}
    for m in list_methods():
        need = tuple(x for x in required_layers(m, LossConfig()) if x not in set(layers))
        if need:
            missing[m] = need
        else:
            ok.append(m)
    return ok, missing


def format_cache_summary(s: dict) -> str:
    """The end-of-run report of cache-teachers: what was cached, the teachers' accuracy on each cached training view,
    sizes, methods (a store that was complete already: the one line that says so)."""
    if s.get("complete"):
        return s["message"]
    lines = [f"cached {s['rows_computed']} sample-views in {s['seconds']:.1f}s ({s['samples_per_s']:.0f} samples/s) -> {s['path']}"]
    lines.append("teacher top-1 on the cached training views (%): " + ", ".join(f"t{k} {arch}" for k, arch in enumerate(s["teachers"])))
    for v, accs in enumerate(s["view_accuracy"]):
        lines.append(f"  view {v}: " + "  ".join(f"{a:.2f}" for a in accs))
    lines.append(f"store size {human(s['store_bytes'])}; per sample-view {per_sample_view_text(s['bytes_per_sample_view'])}")
    ok, missing = servable_methods(s["layers"])
    line = "serves --method " + ", ".join(ok)
    if missing:
        line += "; not " + ", ".join(f"{m} (needs {'+'.join(need)}: {' '.join('-f ' + layout.layer_option(x) for x in need)})"
                                     for m, need in missing.items())
    lines.append(line)
    return "\n".join(lines)
