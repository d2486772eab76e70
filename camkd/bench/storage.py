"""`camkd bench storage`: what each store option costs in bytes and in CA-MKD student accuracy.

The same three teachers (the `bench accuracy --protocol equal` teachers: resnet14, wrn_16_1,
resnet20 on the full Fashion-MNIST training split, 5 epochs; reused from ``--root`` when they are
there, trained otherwise), the same views (seed 0) and the same student seeds, one store per option:

=========  ==============================================================
dense32    dense float32 logits and features
dense16    dense float16 logits and features (the default store)
topk5      top-5 of 10 logits (float16 values, exact float32 scalars), float16 features
topk2      top-2 of 10, otherwise as topk5
int8       dense float16 logits, int8 features (per sample and channel scale)
int8zstd   int8 plus zstd: bytes only (lossless, so its students equal int8's)
=========  ==============================================================

Each option's store is written by cache-teachers; a resnet8 student is distilled with
``--method camkd`` (features included) from it for every seed, on the first ``limit`` training
images for ``epochs`` epochs (= views). Reported per option: bytes per sample-view (logits arrays,
feature arrays, all), the whole store, the tail mass of top-k stores at the run's T, and final test
top-1 (mean +- std over seeds and the paired difference to dense32 per seed). Stores and students
are reused when finished, so a rerun costs only what is new.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from camkd.bench.common import device_info, device_text, machine
from camkd.bench.config import STORE_OPTIONS, StorageConfig
from camkd.bench.stats import RULE, paired, paired_text
from camkd.bench.teachers import HASH_CHARS, TeacherSpec, decay_schedule, digest, ensure_teacher, finished, history
from camkd.cache import CacheConfig, cache_teachers
from camkd.config import DataConfig, LossConfig, OptimConfig, RunConfig
from camkd.device import resolve_device
from camkd.distill import DistillConfig, distill
from camkd.errors import CamkdError
from camkd.output import new_figure
from camkd.progress import log
from camkd.store import open_store
from camkd.store.sizes import array_sizes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BYTES_ONLY = {"int8zstd": "int8"}  # lossless variants: their students would equal these options' students


def _teachers(cfg: StorageConfig) -> tuple[list[str], list[float]]:
    """Checkpoint paths and test top-1 of the teachers, training those not finished yet."""
    paths, accs = [], []
    for arch in cfg.teacher_archs:
        spec = TeacherSpec(arch=arch, dataset=cfg.dataset, epochs=cfg.teacher_epochs, limit=cfg.teacher_limit,
                           options=dict(cfg.data_options))
        log(f"[bench storage] teacher {arch} -> {spec.folder(cfg.root, data_dir=cfg.data_dir)}")
        folder, _ = ensure_teacher(spec, cfg.root, data_dir=cfg.data_dir, device=cfg.device)
        paths.append(str(folder / "last.pth"))
        accs.append(history(folder)[-1]["test_top1"])
    return paths, accs


def _store_row(path: Path, kd_T: float) -> dict:
    store = open_store(path)
    sizes = array_sizes(store.g)
    per = store.n * store.views
    logit_bytes = sum(v for k, v in sizes.items() if k == "logits" or k.startswith("topk/"))
    feature_bytes = sum(v for k, v in sizes.items() if k.startswith("features/"))
    view_bytes = sum(v for k, v in sizes.items() if k in ("aug", "logits") or k.startswith(("topk/", "features/")))
    row = {"store_bytes": sum(sizes.values()), "logits_per_sample_view": logit_bytes / per,
           "features_per_sample_view": feature_bytes / per, "per_sample_view": view_bytes / per}
    tail = (store.description.topk_tail_mass or {}).get(f"{kd_T:g}")
    if tail is not None:
        row["tail_mass_mean"] = tail["mean"]
        row["tail_mass_max"] = tail["max"]
    return row


def run_storage(cfg: StorageConfig) -> dict:
    unknown = [o for o in cfg.options if o not in STORE_OPTIONS]
    if unknown:
        raise CamkdError(f"unknown storage option(s) {', '.join(unknown)}; choose from {', '.join(STORE_OPTIONS)}")
    if cfg.seeds < 1 or cfg.epochs < 1:
        raise CamkdError("--seeds and --epochs must be at least 1")
    root = Path(cfg.root)
    device = resolve_device(cfg.device)
    teachers, teacher_acc = _teachers(cfg)
    # the teachers' folders are content-addressed: with the data and the views they name the store
    tag = digest({"teachers": [Path(t).parent.name for t in teachers], "dataset": cfg.dataset, "limit": cfg.limit,
                  "views": cfg.epochs, "options": cfg.data_options})[:HASH_CHARS]
    recipe = digest({"student": cfg.student, "epochs": cfg.epochs, "batch": cfg.batch_size, "lr": cfg.lr,
                     "kd_T": cfg.kd_T})[:HASH_CHARS]
    rows: dict[str, dict] = {}
    for name in cfg.options:
        path = root / "storage" / f"{name}-{tag}.zarr"
        kw = dict(STORE_OPTIONS[name])
        if "logits" in kw:
            kw["kd_T"] = [cfg.kd_T]
        log(f"[bench storage] {name}: caching -> {path}")
        cache_teachers(CacheConfig(teachers=teachers, dataset=cfg.dataset, data_dir=cfg.data_dir, limit=cfg.limit or None,
                                   views=cfg.epochs, aug_seed=0, features=["penultimate"], out=str(path), device=cfg.device,
                                   progress=False, evaluate=False, options=dict(cfg.data_options), **kw))
        rows[name] = {"option": name, **kw, **_store_row(path, cfg.kd_T), "runs": [], "curves": []}
        if name in BYTES_ONLY:
            continue
        for seed in range(cfg.seeds):
            out = root / "storage" / "students" / f"{path.stem}-camkd-s{seed}-{recipe}"
            if not finished(out, cfg.epochs):
                distill(DistillConfig(arch=cfg.student, method="camkd", cache=str(path), loss=LossConfig(kd_T=cfg.kd_T),
                                      data=DataConfig(dataset=None, data_dir=cfg.data_dir),
                                      optim=OptimConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                                        lr_decay_epochs=decay_schedule(cfg.epochs)),
                                      run=RunConfig(seed=seed, device=cfg.device, out=str(out), auto_resume=True,
                                                    progress=False)))
            curve = [r["test_top1"] for r in history(out)]
            rows[name]["curves"].append(curve)
            rows[name]["runs"].append(curve[-1])
            log(f"[bench storage] {name} seed {seed}: {curve[-1]:.2f}%")
    for name, row in rows.items():
        if name in BYTES_ONLY:
            row["runs"] = list(rows[BYTES_ONLY[name]]["runs"]) if BYTES_ONLY[name] in rows else []
            row["same_as"] = BYTES_ONLY[name]
        runs = row["runs"]
        row["mean"] = statistics.mean(runs) if runs else None
        row["std"] = statistics.stdev(runs) if len(runs) > 1 else 0.0
        for base in ("dense32", "dense16"):
            if base in rows and runs and name not in (base, "int8zstd"):
                row[f"paired_vs_{base}"] = paired(runs, rows[base]["runs"])
    return {"machine": machine(), "device": device_info(device, [torch.get_num_threads()]), "config": asdict(cfg),
            "teachers": dict(zip(cfg.teacher_archs, teacher_acc)), "rows": rows, "rule": RULE}


def to_markdown(r: dict) -> str:
    c = r["config"]
    teachers = ", ".join(f"{a} {acc:.2f}%" for a, acc in r["teachers"].items())
    lines = [f"{c['dataset']}: teachers {teachers}; student {c['student']} (camkd, T={c['kd_T']:g}) on the first "
             f"{c['limit']} training images, {c['epochs']} epochs = views, {c['seeds']} seeds; {device_text(r['device'])}, "
             f"{r['machine']['date']}", "",
             "| option | logits B/sample-view | features B/sample-view | all B/sample-view | store | tail mass at T (mean per teacher) "
             "| top-1 % (mean +- std) | runs | paired vs dense32 | paired vs dense16 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        tail = ", ".join(f"{q:.3f}" for q in row["tail_mass_mean"]) if "tail_mass_mean" in row else "-"
        if row.get("same_as"):
            acc = f"= {row['same_as']} (lossless)"
        elif row["mean"] is None:
            acc = "-"
        else:
            acc = f"{row['mean']:.2f} +- {row['std']:.2f}"
        runs = ", ".join(f"{x:.2f}" for x in row["runs"]) if not row.get("same_as") else "-"
        lines.append(f"| {name} | {row['logits_per_sample_view']:,.0f} | {row['features_per_sample_view']:,.0f} | "
                     f"{row['per_sample_view']:,.0f} | {row['store_bytes'] / 2**20:,.1f} MB | {tail} | {acc} | {runs} | "
                     f"{paired_text(row.get('paired_vs_dense32'))} | {paired_text(row.get('paired_vs_dense16'))} |")
    lines += ["", f"Paired: per seed, the option's top-1 minus the baseline's, mean +- sd over seeds; 'beyond spread' when "
              f"{r['rule']}. The top-k and int8 stores have float16 values, so dense16 is their like-for-like "
              "baseline."]
    return "\n".join(lines)


def plot(r: dict) -> Figure:
    """Left: final top-1 per option (mean, error bar = std over seeds); right: bytes per sample-view, logits and
    features stacked (log scale), so the top-k options' logit savings are visible beside the features."""
    names = list(r["rows"])
    rows = [r["rows"][n] for n in names]
    fig, axes = new_figure(1, 2, (11, 4.5))
    acc, size = axes[0]
    x = range(len(names))
    means = [row["mean"] if row["mean"] is not None else float("nan") for row in rows]
    acc.errorbar(x, means, yerr=[row["std"] for row in rows], fmt="o", capsize=4)
    acc.set_xticks(list(x), names, rotation=20)
    acc.set_ylabel("CA-MKD student test top-1 %")
    acc.set_title(f"accuracy ({r['config']['seeds']} seeds)")
    acc.grid(alpha=0.3)
    logits = [row["logits_per_sample_view"] for row in rows]
    feats = [row["features_per_sample_view"] for row in rows]
    size.bar(x, logits, label="logits (dense or top-k)")
    size.bar(x, feats, bottom=logits, label="features")
    size.set_yscale("log")
    size.set_xticks(list(x), names, rotation=20)
    size.set_ylabel("stored bytes per sample-view (log)")
    size.set_title("store size")
    size.legend(fontsize=8)
    size.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{r['config']['dataset']}: store options, {len(r['teachers'])} teachers")
    return fig
