"""`camkd distill`: train a student from a teacher store (or, with --online, from live teachers).

The loop has no method special cases: a method turns student outputs, teacher targets and
labels into named, already-weighted losses, and the loop sums them. Epoch e (1-based) uses
view (e - 1) mod V; its images are re-derived from (seed, view, index) and checked against the
store's augmentation parameters on the first batch of each view.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import camkd
from camkd.checkpoint import atomic_save, load_checkpoint, prepare_run_dir
from camkd.datasets import Dataset, load_dataset
from camkd.device import resolve_device, set_deterministic
from camkd.errors import CamkdError
from camkd.loop import MetricsFile, check_batch_size, default_lr, evaluate, lr_at, make_sgd, set_lr
from camkd.methods import StudentOut, create_method, required_layers
from camkd.models import create_model
from camkd.progress import Bar, log
from camkd.store import Expect, open_store
from camkd.store.reader import check_expect, load_cached_data
from camkd.targets import CachedTargets, OnlineTargets, check_layers, plan_windows
from camkd.teachers import load_teacher
from camkd.views import AugSpec, augment


@dataclass
class DistillConfig:
    """All options of a distillation run; saved into every checkpoint."""

    arch: str
    method: str = "camkd"
    cache: str | None = None
    gamma: float = 1.0
    alpha: float = 1.0
    beta: float | None = None  # None: the method's reference default (camkd 50, fitnet 100)
    kd_T: float = 4.0
    aekd_C: float = 0.6
    hint_layer: int = 2
    epochs: int = 240
    batch_size: int = 64
    lr: float | None = None
    lr_decay_epochs: list[int] = field(default_factory=lambda: [150, 180, 210])
    lr_decay_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    resume: bool = False
    online: bool = False
    teachers: list[str] = field(default_factory=list)
    dataset: str | None = None  # online without a store: the dataset, views and augmentation seed
    data_dir: str | None = None
    limit: int | None = None
    views: int | None = None
    aug_seed: int | None = None
    feature_memory_mb: float = 4096.0
    window_blocks: int = 4
    deterministic: bool = False
    amp: bool = False
    progress: bool = True
    max_steps: int | None = None  # stop after this many steps (tests, benchmarks)
    synthetic_samples: int | None = None
    record_steps: bool = False  # keep every step's losses in the summary (equality tests)

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        mode = "online" if self.online else "cached"
        return Path("runs") / "students" / f"{self.arch}_{self.method}_{mode}_s{self.seed}"


@dataclass
class _Setup:
    train: Dataset
    test: Dataset
    spec: AugSpec
    views: int
    store_identity: dict


def _setup_cached(cfg: DistillConfig, device: torch.device) -> tuple[_Setup, dict]:
    store = open_store(cfg.cache)
    a = store.attrs
    ds = a["dataset"]
    if cfg.dataset and cfg.dataset != ds["name"]:
        raise CamkdError(f"{cfg.cache} caches dataset '{ds['name']}', not '{cfg.dataset}'; use a store made for {cfg.dataset}")
    train, test, spec = load_cached_data(store, data_dir=cfg.data_dir)
    check_expect(store, Expect(dataset_fingerprint=train.fingerprint, num_classes=train.num_classes, augmentation=spec.to_dict()))
    shapes = {layer: store.feature_shapes(layer) for layer in store.layers}
    return _Setup(train.to(device), test.to(device), spec, store.views, {"teachers": [t["sha256"] for t in a["teachers"]]}), \
        {"store": store, "shapes": shapes, "num_teachers": store.num_teachers}


def _setup_online(cfg: DistillConfig, device: torch.device) -> tuple[_Setup, dict]:
    if not cfg.teachers:
        raise CamkdError("--online needs the teachers: --teacher CKPT (repeat for each)")
    teachers = [load_teacher(s, device=device) for s in cfg.teachers]
    if cfg.cache:  # take data, views and augmentation from the store, without reading its outputs
        store = open_store(cfg.cache)
        a = store.attrs
        if [t.sha256 for t in teachers] != [t["sha256"] for t in a["teachers"]]:
            raise CamkdError(f"--teacher checkpoints differ from the ones {cfg.cache} was made with; pass the same ones in order")
        train, test, spec = load_cached_data(store, data_dir=cfg.data_dir)
        views, block_rows, name = a["views"], store.block_rows, train.name
    else:
        if not cfg.dataset:
            raise CamkdError("--online without --cache needs --dataset")
        name, store = cfg.dataset, None
        opts = {"num_samples": cfg.synthetic_samples} if name == "synthetic" and cfg.synthetic_samples else {}
        train = load_dataset(name, "train", data_dir=cfg.data_dir, limit=cfg.limit, **opts)
        test = load_dataset(name, "test", data_dir=cfg.data_dir)
        views = cfg.views or cfg.epochs
        spec = AugSpec(seed=cfg.aug_seed if cfg.aug_seed is not None else cfg.seed, norm=train.norm)
        block_rows = 1
    for t in teachers:
        if t.num_classes != train.num_classes or t.in_channels != train.in_channels:
            raise CamkdError(f"teacher {t.path} ({t.num_classes} classes, {t.in_channels} channels) does not fit {name}")
    x = torch.zeros((1,) + tuple(train.images.shape[1:]), device=device)
    with torch.inference_mode():
        tf = [t.model(x, is_feat=True)[0] for t in teachers]
    index = {"penultimate": -2}
    index.update({f"hint{i}": i for i in range(len(tf[0])) if all(f[i].ndim == 4 for f in tf)})
    shapes = {name_: [tuple(f[i].shape[1:]) for f in tf] for name_, i in index.items() if all(f[i].ndim == 4 for f in tf)}
    return _Setup(train.to(device), test.to(device), spec, views, {"teachers": [t.sha256 for t in teachers]}), \
        {"teachers": teachers, "shapes": shapes, "index": index, "num_teachers": len(teachers), "block_rows": block_rows,
         "store": store}


def _student_shapes(model: nn.Module, train: Dataset, device: torch.device) -> list[tuple[int, ...]]:
    model.eval()
    with torch.no_grad():
        feats, _ = model(torch.zeros((2,) + tuple(train.images.shape[1:]), device=device), is_feat=True)
    model.train()
    return [tuple(f.shape[1:]) for f in feats]


def distill(cfg: DistillConfig) -> dict:
    """Train the student; returns a summary (accuracies, and with record_steps every step's losses)."""
    device = resolve_device(cfg.device)
    set_deterministic(cfg.deterministic)
    if cfg.cache is None and not cfg.online:
        raise CamkdError("give --cache STORE (made by cache-teachers), or --online with --teacher CKPT ...")
    out = cfg.out_dir()
    last_path, best_path = prepare_run_dir(out, resume=cfg.resume)

    if cfg.cache and cfg.limit is not None:
        raise CamkdError("--limit applies only to --online without --cache: a store fixes the training samples "
                         "(cache a subset with 'cache-teachers --limit N')")
    setup, extra = (_setup_online if cfg.online else _setup_cached)(cfg, device)
    train, test = setup.train, setup.test
    check_batch_size(cfg.batch_size, len(train), drop_last=True)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.arch, num_classes=train.num_classes, in_channels=train.in_channels).to(device)
    s_shapes = _student_shapes(model, train, device)
    needed = required_layers(cfg.method, beta=cfg.beta, hint_layer=cfg.hint_layer)
    check_layers(extra["shapes"], needed, "the teachers' feature list" if cfg.online else str(cfg.cache))
    method = create_method(cfg.method, num_classes=train.num_classes, num_teachers=extra["num_teachers"],
                           student_feat_shapes=s_shapes, teacher_feat_shapes=extra["shapes"], gamma=cfg.gamma,
                           alpha=cfg.alpha, beta=cfg.beta, kd_T=cfg.kd_T, aekd_C=cfg.aekd_C, hint_layer=cfg.hint_layer).to(device)
    layers = needed
    if cfg.online:
        block_rows = extra["block_rows"]
        targets = OnlineTargets(extra["teachers"], layers, extra["index"])
        window_blocks = None
        store = extra.get("store")
        if store is not None and layers and store.feature_bytes_per_view(layers) > cfg.feature_memory_mb * 2**20:
            window_blocks = cfg.window_blocks  # follow the cached run's streamed order exactly
    else:
        store = extra["store"]
        block_rows = store.block_rows
        targets = CachedTargets(store, layers, device, memory_budget_mb=cfg.feature_memory_mb, window_blocks=cfg.window_blocks)
        window_blocks = targets.window_blocks
    if cfg.epochs > setup.views:
        log(f"{cfg.epochs} epochs over {setup.views} cached views: epoch e reuses view (e - 1) mod {setup.views}")

    lr = cfg.lr if cfg.lr is not None else default_lr(model.arch)
    params = list(model.parameters()) + list(method.parameters())
    opt = make_sgd(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    start_epoch, best = 1, {"top1": -1.0, "epoch": 0}
    acc = {"top1": float("nan"), "top5": float("nan")}
    if cfg.resume:
        ckpt = load_checkpoint(last_path)
        meta = ckpt.get("meta") or {}
        checks = (("arch", model.arch), ("method", cfg.method), ("dataset_fingerprint", train.fingerprint),
                  ("teachers", setup.store_identity.get("teachers")))
        for key, want in checks:
            if meta.get(key) != want:
                raise CamkdError(f"--resume: {last_path} was made with {key}={meta.get(key)!r}, this run has {want!r}; "
                                 "use the same options or another --out")
        model.load_state_dict(ckpt["model"])
        method.load_state_dict(ckpt["method"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch, best = meta["epoch"] + 1, ckpt.get("best", best)
        acc = {"top1": meta["accuracy"], "top5": meta["top5"]}
        log(f"resuming {out} at epoch {start_epoch}")
    metrics = MetricsFile(out / "metrics.jsonl", resume_epoch=start_epoch - 1 if cfg.resume else None)

    steps: list[dict] = []
    step_total = 0
    t_run = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs + 1):
        view = (epoch - 1) % setup.views
        set_lr(opt, lr_at(epoch, lr, cfg.lr_decay_epochs, cfg.lr_decay_rate))
        model.train()
        method.train()
        windows = plan_windows(len(train), seed=cfg.seed, epoch=epoch, block_rows=block_rows, window_blocks=window_blocks)
        sums: dict[str, float] = {}
        weight_sum = np.zeros(extra["num_teachers"])
        correct, seen, nsteps = 0, 0, 0
        t0 = time.perf_counter()
        checked = False
        with Bar(f"epoch {epoch}/{cfg.epochs}", len(train), enabled=cfg.progress) as bar:
            for idx, tout in targets.batches(view, windows, cfg.batch_size):
                it = torch.from_numpy(idx).to(device)
                x, aug_params = augment(train.images, it, setup.spec, view=view)
                if not checked and not cfg.online:
                    stored = targets.aug(view)[idx]
                    if not np.array_equal(stored, aug_params.numpy()):
                        raise CamkdError(f"{cfg.cache}: the stored augmentation of view {view} differs from its seeded "
                                         "replay; the store was made by an incompatible camkd; re-cache")
                    checked = True
                if tout is None:
                    tout = targets.compute(x)
                y = train.labels[it]
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                    feats, logits = model(x, is_feat=True)
                    losses, info = method(StudentOut(logits=logits.float(), feats=feats), tout, y, epoch=epoch)
                loss = sum(losses.values())
                if not bool(torch.isfinite(loss.detach())):
                    raise CamkdError(f"loss became {float(loss.detach())} at epoch {epoch} step {nsteps} (batch indices {idx[:4].tolist()}...); "
                                     f"lower --lr or the loss weights; the last good checkpoint is kept in {out}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                values = {k: float(v.detach()) for k, v in losses.items()}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                if "teacher_weights" in info:
                    weight_sum += np.asarray(info["teacher_weights"], dtype=np.float64)
                if cfg.record_steps:
                    steps.append({"epoch": epoch, "loss": float(loss.detach()), **values})
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(idx)
                nsteps += 1
                step_total += 1
                bar.update(len(idx), f"loss {values and sum(values.values()):.3f} {bar.rate():.0f} img/s")
                if cfg.max_steps is not None and step_total >= cfg.max_steps:
                    break
        train_time = time.perf_counter() - t0
        acc = evaluate(model, test, amp=cfg.amp)
        record = {"epoch": epoch, "view": view, "lr": opt.param_groups[0]["lr"],
                  **{f"loss_{k}": v / max(nsteps, 1) for k, v in sums.items()},
                  "train_acc": 100.0 * correct / max(seen, 1), "test_top1": acc["top1"], "test_top5": acc["top5"],
                  "teacher_weights": (weight_sum / max(nsteps, 1)).tolist(), "images_per_s": seen / max(train_time, 1e-9)}
        metrics.write(record)
        meta = {"arch": model.arch, "method": cfg.method, "num_classes": train.num_classes, "in_channels": train.in_channels,
                "image_size": train.image_size, "dataset": train.name, "dataset_fingerprint": train.fingerprint,
                "teachers": setup.store_identity.get("teachers"), "epoch": epoch, "accuracy": acc["top1"], "top5": acc["top5"],
                "options": asdict(cfg), "camkd_version": camkd.__version__}
        if acc["top1"] > best["top1"]:
            best = {"top1": acc["top1"], "epoch": epoch}
            atomic_save({"model": model.state_dict(), "method": method.state_dict(), "meta": meta}, best_path)
        atomic_save({"model": model.state_dict(), "method": method.state_dict(), "optimizer": opt.state_dict(),
                     "meta": meta, "best": best}, last_path)
        if cfg.progress:
            parts = " ".join(f"{k} {v / max(nsteps, 1):.3f}" for k, v in sums.items())
            log(f"{model.arch}/{cfg.method} epoch {epoch}/{cfg.epochs} (view {view}): {parts} | test top1 {acc['top1']:.2f}% "
                f"({record['images_per_s']:.0f} img/s)")
        if cfg.max_steps is not None and step_total >= cfg.max_steps:
            break
    return {"arch": model.arch, "method": cfg.method, "out": str(out), "last_top1": acc["top1"], "best_top1": best["top1"],
            "best_epoch": best["epoch"], "seconds": time.perf_counter() - t_run, "steps": steps,
            "mode": "online" if cfg.online else "cached"}
