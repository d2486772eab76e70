"""`camkd train-teacher`: train one CIFAR-zoo model with the reference's recipe on seeded views."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import camkd
from camkd.checkpoint import atomic_save, load_checkpoint, prepare_run_dir
from camkd.datasets import Dataset, load_dataset
from camkd.device import resolve_device, set_deterministic
from camkd.errors import CamkdError
from camkd.loop import MetricsFile, batches, check_batch_size, default_lr, epoch_order, evaluate, lr_at, make_sgd, set_lr
from camkd.models import create_model
from camkd.progress import Bar, log
from camkd.views import AugSpec, augment


@dataclass
class TrainConfig:
    """All options of a teacher run; saved into every checkpoint."""

    arch: str
    dataset: str
    data_dir: str | None = None
    download: bool = False
    trial: int = 0
    epochs: int = 240
    batch_size: int = 64
    lr: float | None = None  # None: the reference's per-arch default
    lr_decay_epochs: list[int] = field(default_factory=lambda: [150, 180, 210])
    lr_decay_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    limit: int | None = None
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    resume: bool = False
    deterministic: bool = False
    amp: bool = False
    progress: bool = True
    synthetic_samples: int | None = None
    synthetic_classes: int | None = None

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / "teachers" / f"{self.arch}_{self.dataset}_trial_{self.trial}"


def load_split(cfg, split: str, device: torch.device) -> Dataset:
    """A split of the configured dataset on ``device`` (limit applies to the training split only)."""
    opts = {}
    if cfg.dataset == "synthetic":
        opts = {"num_samples": getattr(cfg, "synthetic_samples", None), "num_classes": getattr(cfg, "synthetic_classes", None)}
        opts = {k: v for k, v in opts.items() if v}
    ds = load_dataset(cfg.dataset, split, data_dir=cfg.data_dir, download=cfg.download,
                      limit=cfg.limit if split == "train" else None, **opts)
    ds.fingerprint  # computed on CPU, before the move
    return ds.to(device)


def _meta(cfg: TrainConfig, model: nn.Module, train: Dataset, epoch: int, acc: dict) -> dict:
    return {
        "arch": model.arch, "num_classes": train.num_classes, "in_channels": train.in_channels,
        "image_size": train.image_size, "dataset": train.name, "dataset_fingerprint": train.fingerprint,
        "num_train": len(train), "normalization": train.norm.to_dict(), "epoch": epoch,
        "accuracy": acc["top1"], "top5": acc["top5"], "options": asdict(cfg), "camkd_version": camkd.__version__,
    }


def _check_resume(ckpt: dict, cfg: TrainConfig, model: nn.Module, train: Dataset, path: Path) -> None:
    meta = ckpt.get("meta") or {}
    for key, want in (("arch", model.arch), ("dataset", train.name), ("dataset_fingerprint", train.fingerprint)):
        if meta.get(key) != want:
            raise CamkdError(
                f"--resume: {path} was made with {key}={meta.get(key)!r}, this run has {want!r}; "
                "use the same options or another --out"
            )
    if "optimizer" not in ckpt:
        raise CamkdError(f"--resume: {path} holds no optimizer state; it is not a camkd last checkpoint")


def train_teacher(cfg: TrainConfig) -> dict:
    """Train, evaluate each epoch, keep best/last checkpoints and metrics; returns a summary dict."""
    device = resolve_device(cfg.device)
    set_deterministic(cfg.deterministic)
    out = cfg.out_dir()
    last_path, best_path = prepare_run_dir(out, resume=cfg.resume)

    train, test = load_split(cfg, "train", device), load_split(cfg, "test", device)
    if cfg.batch_size < 2:
        raise CamkdError("--batch-size must be at least 2 (BatchNorm)")
    check_batch_size(cfg.batch_size, len(train), drop_last=False)
    if cfg.limit is not None and cfg.limit > len(train):
        log(f"--limit {cfg.limit} is more than the {len(train)} samples of {train.name}; using all {len(train)}")
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.arch, num_classes=train.num_classes, in_channels=train.in_channels).to(device)
    if device.type == "cuda" and cfg.amp:
        model = model.to(memory_format=torch.channels_last)
    lr = cfg.lr if cfg.lr is not None else default_lr(model.arch)
    opt = make_sgd(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    spec = AugSpec(seed=cfg.seed, norm=train.norm)

    start_epoch, best = 1, {"top1": -1.0, "epoch": 0}
    acc = {"top1": float("nan"), "top5": float("nan")}
    if cfg.resume:
        ckpt = load_checkpoint(last_path)
        _check_resume(ckpt, cfg, model, train, last_path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch = ckpt["meta"]["epoch"] + 1
        best = ckpt.get("best", best)
        acc = {"top1": ckpt["meta"]["accuracy"], "top5": ckpt["meta"]["top5"]}
        log(f"resuming {out} at epoch {start_epoch}")
    metrics = MetricsFile(out / "metrics.jsonl", resume_epoch=start_epoch - 1 if cfg.resume else None)

    loss_fn = nn.CrossEntropyLoss()
    t_run = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs + 1):
        set_lr(opt, lr_at(epoch, lr, cfg.lr_decay_epochs, cfg.lr_decay_rate))
        model.train()
        order = epoch_order(cfg.seed, epoch, len(train))
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen, t0 = 0, time.perf_counter()
        with Bar(f"epoch {epoch}/{cfg.epochs}", len(train), enabled=cfg.progress) as bar:
            for step, idx in enumerate(batches(order, cfg.batch_size, drop_last=False)):
                x, _ = augment(train.images, idx, spec, view=epoch - 1)
                y = train.labels[idx.to(device)]
                if device.type == "cuda" and cfg.amp:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                    logits = model(x)
                    loss = loss_fn(logits.float(), y)
                if not torch.isfinite(loss):
                    raise CamkdError(f"loss became {float(loss)} at epoch {epoch} step {step}; lower --lr (last good checkpoint kept in {out})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(idx)
                if bar.live and step % 10 == 0:
                    bar.update(len(idx) if step == 0 else 0)
                    bar.update(0, f"loss {float(loss_sum) / seen:.3f} acc {100 * int(correct) / seen:.1f} {bar.rate():.0f} img/s")
                elif bar.live:
                    bar.update(len(idx))
        train_time = time.perf_counter() - t0
        acc = evaluate(model, test, amp=cfg.amp)
        record = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": float(loss_sum) / max(seen, 1),
                  "train_acc": 100.0 * int(correct) / max(seen, 1), "test_top1": acc["top1"], "test_top5": acc["top5"],
                  "test_loss": acc["loss"], "images_per_s": seen / max(train_time, 1e-9)}
        metrics.write(record)
        meta = _meta(cfg, model, train, epoch, acc)
        if acc["top1"] > best["top1"]:
            best = {"top1": acc["top1"], "epoch": epoch}
            atomic_save({"model": model.state_dict(), "meta": meta}, best_path)
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "meta": meta, "best": best}, last_path)
        if cfg.progress:
            log(f"{model.arch} epoch {epoch}/{cfg.epochs}: loss {record['train_loss']:.3f} train {record['train_acc']:.1f}% "
                f"test top1 {acc['top1']:.2f}% top5 {acc['top5']:.2f}% ({record['images_per_s']:.0f} img/s)")
    summary = {"arch": model.arch, "out": str(out), "epochs": cfg.epochs, "last_top1": acc["top1"],
               "best_top1": best["top1"], "best_epoch": best["epoch"], "seconds": time.perf_counter() - t_run}
    return summary
