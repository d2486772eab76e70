"""`camkd bench accuracy --protocol equal|unequal`: every method over seeds, from teachers of equal or unequal quality.

Defaults (a 2-core CPU, about an hour per protocol; each is one command):

- **equal**: teachers resnet14, wrn_16_1 and resnet20, each trained on the full Fashion-MNIST
  training split for 5 epochs (lr 0.05, x0.1 after epochs 3 and 4, batch 64, seed 0, the
  ``train-teacher`` recipe otherwise): exactly
  ``camkd train-teacher -m ARCH -d fashion-mnist --epochs 5 --lr-decay-epochs 3,4 --seed 0``.
- **unequal**: the same archs; strong = the equal protocol's resnet14 (the same spec, so the same
  folder: reused, not retrained); weak = wrn_16_1 trained on only the first 1000 training images
  (same recipe); noisy = resnet20 on the full split with 40 % of its labels moved to another
  class (``--label-noise 0.4 --label-noise-seed 0``).
- each protocol: the teachers cached once into a float32 store (features ``penultimate`` and
  ``hint:2``, so every method runs; 5 views, augmentation seed 0), then every method (ce, kd,
  avg, ebkd, aekd, fitnet, camkd) distilled into a resnet8 student on the first 10000 training
  images for 5 epochs (lr 0.05, x0.1 after epochs 3 and 4, batch 64; the ``distill`` defaults
  otherwise) with seeds 0, 1, 2, plus camkd ``--online`` with seed 0 (it must agree with the
  cached run). Test accuracy is on the full, clean test split.

Results: mean +- std of the last epoch's test top-1 per method; per-seed paired differences
(camkd - avg, camkd - kd) with their mean and std, called larger than the seed spread when
|mean| > 2 sd / sqrt(n) (two standard errors of the paired mean), and the paired t statistic
with a two-sided 5 % t-test beside it (stricter for 3 seeds: |t| > 4.30); the teachers' test top-1 and
pairwise disagreement (fraction of test images where two teachers' top-1 differ); CA-MKD's
logit-level weight of each teacher (a pure function of the teachers' cross-entropies, computed
from the store's view 0 over all samples) on the samples that teacher gets wrong vs right; the
per-epoch ``teacher_weights`` every method logged.

Everything is content-addressed under ``--root`` (:mod:`camkd.bench.teachers`): rerunning the
command, or adding a method or a seed, trains only what is new, and an interrupted run resumes.

The larger setting, the same command on a GPU: ``--device cuda --limit 0 --epochs 30
--teacher-epochs 30 --views 10`` (the full 60k students, 10 views cycled over 30 epochs: a
68 GB float32 store, 113 KB per sample-view, two thirds of it the hint:2 features; decay scaled to
19, 22, 26), or CIFAR-100 with the reference's recipe and archs ``--dataset cifar100 --data-dir D
--teacher-arch resnet32x4 --teacher-arch resnet56 --teacher-arch wrn_40_2 --student vgg8
--teacher-epochs 240 --epochs 240 --views 12 --dtype float16 --limit 0 --weak-limit 5000
--device cuda`` (about 100 GB: 172 KB per sample-view). The default store is 5.6 GB.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from camkd.bench.common import device_info, device_text, machine
from camkd.bench.config import PROTOCOLS, AccuracyConfig
from camkd.bench.stats import RULE, paired
from camkd.bench.teachers import HASH_CHARS, TeacherSpec, data_fingerprint, decay_schedule, digest, ensure_teacher, finished, history
from camkd.device import resolve_device
from camkd.errors import CamkdError
from camkd.evaluate import BATCH_SIZE as EVAL_BATCH_SIZE
from camkd.methods import list_methods
from camkd.output import new_figure
from camkd.progress import log

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PAIRS = (("camkd", "avg"), ("camkd", "kd"))


def teacher_specs(cfg: AccuracyConfig) -> list[TeacherSpec]:
    """The protocol's three teachers, in store order."""
    if cfg.protocol not in PROTOCOLS:
        raise CamkdError(f"unknown --protocol '{cfg.protocol}'; choose one of: {', '.join(PROTOCOLS)}")
    if len(cfg.teacher_archs) != 3:
        raise CamkdError(f"the protocols have three teachers; give --teacher-arch three times, got {len(cfg.teacher_archs)}")
    from camkd.data.noise import check_rate
    from camkd.models import resolve_arch

    archs = [resolve_arch(a) for a in cfg.teacher_archs]  # unknown names refused before any work
    resolve_arch(cfg.student)
    if cfg.protocol == "equal" and len(set(archs)) < 3:
        raise CamkdError(f"the equal protocol's teachers differ only by arch; give three different --teacher-arch, got {archs}")
    if cfg.protocol == "unequal":
        check_rate(cfg.noise_rate)
    common = dict(dataset=cfg.dataset, epochs=cfg.teacher_epochs, lr=cfg.teacher_lr, batch_size=cfg.teacher_batch_size,
                  seed=cfg.teacher_seed, options=dict(cfg.data_options))
    a, b, c = cfg.teacher_archs
    if cfg.protocol == "equal":
        return [TeacherSpec(arch, role=arch, **common) for arch in (a, b, c)]
    return [TeacherSpec(a, role="strong", **common),
            TeacherSpec(b, role="weak", limit=cfg.weak_limit, **common),
            TeacherSpec(c, role="noisy", label_noise=cfg.noise_rate, label_noise_seed=cfg.noise_seed, **common)]


def _student_optim(cfg: AccuracyConfig):
    from camkd.config import OptimConfig

    return OptimConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, lr_decay_epochs=decay_schedule(cfg.epochs))


def store_identity(cfg: AccuracyConfig, shas: list[str]) -> dict:
    return {"kind": "store", "teachers": shas,
            "data": {"dataset": cfg.dataset, "limit": cfg.limit, "options": cfg.data_options,
                     "fingerprint": data_fingerprint(cfg.dataset, data_dir=cfg.data_dir, limit=cfg.limit, options=cfg.data_options)},
            "views": cfg.views or cfg.epochs, "dtype": cfg.dtype, "features": sorted(cfg.features), "aug_seed": cfg.aug_seed}


def student_identity(cfg: AccuracyConfig, store_key: str, method: str, seed: int, online: bool) -> dict:
    from camkd.config import LossConfig

    return {"kind": "student", "store": store_key, "method": method, "seed": seed, "online": online,
            "arch": cfg.student, "optim": asdict(_student_optim(cfg)), "loss": asdict(LossConfig())}


def _ensure_store(cfg: AccuracyConfig, teachers: list[str], shas: list[str], root: Path, work: dict) -> tuple[Path, str]:
    from camkd.cache import CacheConfig, cache_teachers

    key = digest(store_identity(cfg, shas))
    path = root / "stores" / f"{key[:HASH_CHARS]}.zarr"
    done = path.with_suffix(".done")
    if not done.exists():
        log(f"[bench] caching the teachers into {path}")
        cache_teachers(CacheConfig(teachers=teachers, dataset=cfg.dataset, data_dir=cfg.data_dir, limit=cfg.limit,
                                   views=cfg.views or cfg.epochs, aug_seed=cfg.aug_seed, features=list(cfg.features), dtype=cfg.dtype,
                                   out=str(path), device=cfg.device, progress=cfg.progress, options=dict(cfg.data_options)))
        done.write_text(json.dumps(store_identity(cfg, shas), indent=2, sort_keys=True) + "\n")
        work["stores"].append(str(path))
    return path, key


def _ensure_student(cfg: AccuracyConfig, store: Path, store_key: str, teachers: list[str], method: str, seed: int,
                    online: bool, root: Path, work: dict) -> Path:
    from camkd.config import DataConfig, RunConfig
    from camkd.distill import DistillConfig, distill

    key = digest(student_identity(cfg, store_key, method, seed, online))
    folder = root / "students" / f"{method}{'-online' if online else ''}-s{seed}-{key[:HASH_CHARS]}"
    if finished(folder, cfg.epochs):
        return folder
    log(f"[bench] {cfg.protocol}: {method}{' --online' if online else ''} seed {seed} -> {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(student_identity(cfg, store_key, method, seed, online), indent=2,
                                                 sort_keys=True) + "\n")
    distill(DistillConfig(arch=cfg.student, method=method, cache=str(store), online=online,
                          teachers=list(teachers) if online else [],
                          data=DataConfig(dataset=None, data_dir=cfg.data_dir), optim=_student_optim(cfg),
                          run=RunConfig(seed=seed, device=cfg.device, out=str(folder), auto_resume=True, progress=cfg.progress)))
    work["students"].append(folder.name)
    return folder


# ----------------------------------------------------------------------------------------- analyses
def disagreement(preds: np.ndarray) -> list[list[float]]:
    """``preds`` [K, N] top-1 classes -> [K, K] fraction of the N samples where teachers i and j differ."""
    k = preds.shape[0]
    return [[float((preds[i] != preds[j]).mean()) for j in range(k)] for i in range(k)]


def weights_by_correctness(logits: np.ndarray, labels: np.ndarray, noisy_idx: dict[int, np.ndarray] | None = None) -> list[dict]:
    """CA-MKD's logit-level weights (``confidence_weights`` of each teacher's CE on the label) from ``logits``
    [N, K, C], then per teacher: its accuracy, the mean weight on the samples it gets wrong and right, and on
    the samples it gets wrong while another teacher is right. ``noisy_idx[k]``: the samples whose label teacher
    k was trained with corrupted (also the mean weight there)."""
    from camkd.methods.functional import confidence_weights

    t = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    n, k, c = t.shape
    ce = torch.nn.functional.cross_entropy(t.reshape(n * k, c), y.repeat_interleave(k), reduction="none").view(n, k)
    w = confidence_weights(ce).numpy()
    right = (t.argmax(-1) == y[:, None]).numpy()  # [N, K]
    out = []
    for j in range(k):
        others_right = np.delete(right, j, axis=1).any(axis=1)
        wrong = ~right[:, j]
        row = {"teacher": j, "accuracy": float(right[:, j].mean() * 100), "n_wrong": int(wrong.sum()),
               "w_wrong": _mean(w[wrong, j]), "w_right": _mean(w[~wrong, j]),
               "n_wrong_others_right": int((wrong & others_right).sum()), "w_wrong_others_right": _mean(w[wrong & others_right, j]),
               "w_mean": _mean(w[:, j])}
        if noisy_idx and j in noisy_idx:
            idx = noisy_idx[j][noisy_idx[j] < n]
            mask = np.zeros(n, dtype=bool)
            mask[idx] = True
            row.update({"n_corrupted": int(mask.sum()), "w_corrupted": _mean(w[mask, j]), "w_clean": _mean(w[~mask, j]),
                        "accuracy_corrupted": _mean(right[mask, j].astype(np.float64) * 100)})
        out.append(row)
    return out


def _mean(a: np.ndarray) -> float | None:
    return float(a.mean()) if a.size else None


@torch.inference_mode()
def _teacher_test(cfg: AccuracyConfig, teachers: list[str]) -> dict:
    """Each teacher's test top-1 and the pairwise disagreement of their top-1 on the test split."""
    from camkd.data import load_split
    from camkd.data.norm import normalize
    from camkd.teachers import load_teachers

    dev = resolve_device(cfg.device)
    test = load_split(cfg.dataset, "test", device=dev, data_dir=cfg.data_dir, **cfg.data_options)
    preds = []
    for t in load_teachers(teachers, device=dev):
        p = [t.model(normalize(x, test.norm)).argmax(1) for x, _ in test.eval_batches(EVAL_BATCH_SIZE, dev)]
        preds.append(torch.cat(p).cpu().numpy())
    preds = np.stack(preds)
    y = test.labels.cpu().numpy()
    right = preds == y[None]
    return {"top1": [float(r.mean() * 100) for r in right], "disagreement": disagreement(preds),
            "all_right": float(right.all(0).mean()), "some_wrong_some_right": float((right.any(0) & ~right.all(0)).mean()),
            "all_wrong": float((~right.any(0)).mean()), "n": len(y)}


def _noisy_indices(cfg: AccuracyConfig, specs: list[TeacherSpec]) -> dict[int, np.ndarray]:
    from camkd.data import load_dataset
    from camkd.data.noise import noisy_labels

    out = {}
    for j, s in enumerate(specs):
        if s.label_noise:
            ds = load_dataset(s.dataset, "train", data_dir=cfg.data_dir, limit=s.limit, **s.options)
            out[j] = noisy_labels(ds.labels.numpy(), ds.num_classes, s.label_noise, s.label_noise_seed)[1]
    return out


def run_accuracy(cfg: AccuracyConfig) -> dict:
    """Train (or reuse) the teachers, the store and every student; return the tables and analyses."""
    t_start = time.perf_counter()
    specs = teacher_specs(cfg)
    device = resolve_device(cfg.device)
    unknown = [m for m in cfg.methods if m not in list_methods()]
    if unknown:
        raise CamkdError(f"unknown method '{unknown[0]}'; choose from: {', '.join(list_methods())}")
    if not cfg.seeds:
        raise CamkdError("give at least one seed")
    root = Path(cfg.root)
    work: dict[str, list] = {"teachers": [], "stores": [], "students": []}
    folders = []
    for s in specs:
        log(f"[bench] {cfg.protocol}: teacher {s.role} ({s.arch}) -> {s.folder(root, data_dir=cfg.data_dir)}")
        folder, trained = ensure_teacher(s, root, data_dir=cfg.data_dir, device=cfg.device, progress=cfg.progress)
        folders.append(folder)
        if trained:
            work["teachers"].append(folder.name)
    ckpts = [str(f / "last.pth") for f in folders]
    from camkd.checkpoint import sha256_file

    shas = [sha256_file(p) for p in ckpts]
    store, store_key = _ensure_store(cfg, ckpts, shas, root, work)

    curves: dict[str, list[list[float]]] = {}
    finals: dict[str, list[float]] = {}
    logged_weights: dict[str, list[list[list[float]]]] = {}
    logged_inter: dict[str, list[list[list[float] | None]]] = {}
    runs = [(m, seed, False) for seed in cfg.seeds for m in cfg.methods]
    if cfg.online and "camkd" in cfg.methods:
        runs.append(("camkd", cfg.seeds[0], True))
    student_dirs = {}
    for method, seed, online in runs:
        name = method + (" --online" if online else "")
        folder = _ensure_student(cfg, store, store_key, ckpts, method, seed, online, root, work)
        student_dirs[f"{name} s{seed}"] = str(folder)
        h = history(folder)
        curves.setdefault(name, []).append([rec["test_top1"] for rec in h])
        finals.setdefault(name, []).append(h[-1]["test_top1"])
        if h and "teacher_weights" in h[0]:
            logged_weights.setdefault(name, []).append([rec["teacher_weights"] for rec in h])
        if any("inter_weights" in rec for rec in h):  # camkd's feature level (from epoch 2, when its term starts)
            logged_inter.setdefault(name, []).append([rec.get("inter_weights") for rec in h])
        log(f"[bench] {cfg.protocol}: {name} seed {seed}: {h[-1]['test_top1']:.2f}%")

    table = {name: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v}
             for name, v in finals.items()}
    pairs = {f"{a} - {b}": paired(finals[a], finals[b]) for a, b in PAIRS if a in finals and b in finals}
    agree = None
    if "camkd --online" in finals:
        c, o = curves["camkd"][0], curves["camkd --online"][0]
        agree = {"cached": finals["camkd"][0], "online": finals["camkd --online"][0],
                 "abs_diff": abs(finals["camkd"][0] - finals["camkd --online"][0]),
                 "max_abs_diff_per_epoch": max(abs(x - y) for x, y in zip(c, o))}

    from camkd.store import open_store

    st = open_store(str(store))
    w_store = weights_by_correctness(st.logits(0).float().numpy(), st.labels(), _noisy_indices(cfg, specs))
    weight_curves = {name: [[statistics.mean(run[e][k] for run in per) for k in range(len(specs))]
                            for e in range(min(len(run) for run in per))] for name, per in logged_weights.items()}
    inter_curves = {name: [None if any(run[e] is None for run in per) else
                           [statistics.mean(run[e][k] for run in per) for k in range(len(specs))]
                           for e in range(min(len(run) for run in per))] for name, per in logged_inter.items()}
    tt = _teacher_test(cfg, ckpts)
    teachers = [{"role": s.role, "arch": s.arch, "folder": str(f), "sha256": sha, "limit": s.limit,
                 "label_noise": s.label_noise, "label_noise_seed": s.label_noise_seed if s.label_noise else None,
                 "epochs": s.epochs, "test_top1": acc}
                for s, f, sha, acc in zip(specs, folders, shas, tt["top1"])]
    for t, f in zip(teachers, folders):
        h = history(f)
        t["logged_test_top1"] = h[-1]["test_top1"] if h else None
        t["train_images"] = torch.load(f / "last.pth", map_location="cpu", weights_only=True)["meta"].get("num_train")
    return {"protocol": cfg.protocol, "machine": machine(), "device": device_info(device, [torch.get_num_threads()]),
            "config": asdict(cfg), "teachers": teachers,
            "teacher_test": tt, "store": str(store), "table": table, "curves": curves, "paired": pairs, "rule": RULE,
            "cache_vs_online": agree, "weights_store_view0": w_store, "weights_logged": weight_curves,
            "inter_weights_logged": inter_curves,
            "runs": student_dirs, "work": work, "seconds": time.perf_counter() - t_start}


# ----------------------------------------------------------------------------------------- output
def _f(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def to_markdown(r: dict) -> str:
    c = r["config"]
    names = [t["role"] for t in r["teachers"]]
    lines = [f"**Protocol {r['protocol']}**: {c['dataset']}, student {c['student']} on the first {c['limit'] or 'all'} "
             f"training images, {c['epochs']} epochs ({c.get('views') or c['epochs']} cached views, {c['dtype']}), "
             f"batch {c['batch_size']}, "
             f"lr {c['lr']}, seeds {', '.join(map(str, c['seeds']))}; {device_text(r['device'])}, "
             f"{r['machine']['cores']} cores, {r['machine']['date']}; "
             f"this invocation {r['seconds'] / 60:.1f} min (it trained {len(r['work']['teachers'])} teachers, "
             f"{len(r['work']['students'])} students, {len(r['work']['stores'])} stores; the rest was reused)", "",
             "| teacher | arch | trained on | epochs | test top-1 % |", "|---|---|---|---|---|"]
    for t in r["teachers"]:
        what = f"{t['train_images']} images" + (f", {t['label_noise'] * 100:.0f} % labels corrupted (seed "
                                                f"{t['label_noise_seed']})" if t["label_noise"] else "")
        lines.append(f"| {t['role']} | {t['arch']} | {what} | {t['epochs']} | {t['test_top1']:.2f} |")
    tt = r["teacher_test"]
    lines += ["", "Pairwise disagreement on the test split (fraction of the test images where the two teachers' top-1 differ):",
              "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, n in enumerate(names):
        lines.append(f"| {n} | " + " | ".join(_f(x) for x in tt["disagreement"][i]) + " |")
    lines += ["", f"All teachers right on {tt['all_right'] * 100:.1f} % of the test images, some right and some wrong on "
              f"{tt['some_wrong_some_right'] * 100:.1f} %, all wrong on {tt['all_wrong'] * 100:.1f} %.", "",
              "| method | top-1 % (mean +- std) | runs (seeds " + ", ".join(map(str, c["seeds"])) + ") |", "|---|---|---|"]
    for name, row in sorted(r["table"].items(), key=lambda kv: ("online" in kv[0], -kv[1]["mean"])):
        lines.append(f"| {name} | {row['mean']:.2f} +- {row['std']:.2f} | {', '.join(f'{x:.2f}' for x in row['runs'])} |")
    if r["paired"]:
        lines += ["", f"Paired by seed (the same seed gives both runs the same init and sample order); the difference "
                  f"is called larger than the seed spread when {r['rule']}:", "",
                  "| pair | per-seed differences | mean | sd | 2 sd / sqrt(n) | exceeds | t | paired t-test, 5 % two-sided |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, p in r["paired"].items():
            crit = p.get("t_crit_95")
            lines.append(f"| {name} | {', '.join(f'{d:+.2f}' for d in p['diffs'])} | {p['mean']:+.2f} | {_f(p['sd'], 2)} | "
                         f"{_f(p['threshold'], 2)} | {'yes' if p['exceeds'] else 'no'} | {_f(p.get('t'), 2)} | "
                         f"{'passes' if p.get('t_test_95') else 'does not pass'} (needs \\|t\\| > {_f(crit, 2)}) |")
    if r["cache_vs_online"]:
        a = r["cache_vs_online"]
        lines += ["", f"camkd from the store {a['cached']:.2f} % vs --online {a['online']:.2f} % (seed {c['seeds'][0]}): "
                  f"difference {a['abs_diff']:.2f} (largest per-epoch difference {a['max_abs_diff_per_epoch']:.2f})"]
    ws = r["weights_store_view0"]
    has_noise = any("w_corrupted" in w for w in ws)
    lines += ["", "CA-MKD's logit-level weight of each teacher, from the store (view 0, all training samples; the "
              "weights sum to 1 over the teachers, 1/3 = equal):", "",
              "| teacher | train acc % (view 0) | wrong | mean w when wrong | when right | wrong while another is right (n, mean w)"
              + (" | label corrupted in its training (n, mean w, its acc %) |" if has_noise else " |"),
              "|---|---|---|---|---|---|" + ("---|" if has_noise else "")]
    for n, w in zip(names, ws):
        row = (f"| {n} | {w['accuracy']:.2f} | {w['n_wrong']} | {_f(w['w_wrong'])} | {_f(w['w_right'])} | "
               f"{w['n_wrong_others_right']}, {_f(w['w_wrong_others_right'])} |")
        if has_noise:
            row += (f" {w['n_corrupted']}, {_f(w['w_corrupted'])}, {_f(w['accuracy_corrupted'], 1)} |" if "w_corrupted" in w
                    else " |")
        lines.append(row)
    if r["weights_logged"]:
        lines += ["", "Teacher weights each method logged (batch means per epoch, mean over seeds; " + ", ".join(names) + "):", "",
                  "| method | " + " | ".join(f"epoch {e + 1}" for e in range(c["epochs"])) + " |",
                  "|---" * (c["epochs"] + 1) + "|"]
        for name, per in r["weights_logged"].items():
            if all(abs(x - 1 / len(names)) < 1e-6 for ep in per for x in ep) or not any(x for ep in per for x in ep):
                continue  # uniform by construction (kd, avg, fitnet) or none (ce)
            lines.append(f"| {name} | " + " | ".join("/".join(f"{x:.3f}" for x in ep) for ep in per) + " |")
        for name, per in (r.get("inter_weights_logged") or {}).items():
            lines.append(f"| {name}, feature level (inter_weights) | " + " | ".join(
                "-" if ep is None else "/".join(f"{x:.3f}" for x in ep) for ep in per) + " |")
    return "\n".join(lines)


def plot(r: dict) -> Figure:
    """Left: test top-1 per epoch per method (mean over seeds); right: final top-1 with the seeds' std as error bars."""
    fig, axes = new_figure(1, 2, (12, 4.5))
    ax, bx = axes[0]
    for name, runs in r["curves"].items():
        length = min(len(c) for c in runs)
        mean = [statistics.mean(c[i] for c in runs) for i in range(length)]
        if "online" in name:  # one seed only: its points, not a line to compare with the means
            ax.plot(range(1, length + 1), mean, marker="x", linestyle="none", color="k", label=f"{name}, seed {r['config']['seeds'][0]}")
        else:
            ax.plot(range(1, length + 1), mean, marker="o", label=name)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 % (mean over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    names = sorted((n for n in r["table"] if "online" not in n), key=lambda n: -r["table"][n]["mean"])
    means = [r["table"][n]["mean"] for n in names]
    stds = [r["table"][n]["std"] for n in names]
    bx.bar(names, means, yerr=stds, capsize=4, color="tab:gray")
    for i, n in enumerate(names):
        bx.scatter([i] * len(r["table"][n]["runs"]), r["table"][n]["runs"], color="k", s=10, zorder=3)
    lo = min(min(r["table"][n]["runs"]) for n in names)
    hi = max(max(r["table"][n]["runs"]) for n in names)
    bx.set_ylim(lo - max(1.0, (hi - lo) * 0.3), hi + max(0.5, (hi - lo) * 0.2))
    bx.set_ylabel("final test top-1 % (mean +- std, dots: seeds)")
    bx.grid(alpha=0.3, axis="y")
    c = r["config"]
    teach = ", ".join(f"{t['role']} {t['test_top1']:.1f}%" if t["role"] != t["arch"] else f"{t['arch']} {t['test_top1']:.1f}%"
                      for t in r["teachers"])
    fig.suptitle(f"{r['protocol']} teachers ({teach}) -> {c['student']}, {c['dataset']}", fontsize=10)
    return fig
