"""The one training loop: teacher training and every distillation method run through :func:`fit`.

A job builds a model, a method (``ce`` for teacher training), a teacher source (none, a store,
or live teachers) and the data, then calls ``fit``. The loop has no mode branches and its step
never waits on the host: losses, accuracy counts and method diagnostics accumulate as device
tensors and are read once per epoch (a non-finite loss is caught there, or every
``CHECK_EVERY`` steps, and the run stops with the last good checkpoint kept).

Epoch e (1-based) uses view (e - 1) mod V and the seeded order of :mod:`camkd.data.order`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

import camkd
from camkd.config import OptimConfig, RunConfig
from camkd.data import Dataset
from camkd.data.order import epoch_order, view_of_epoch
from camkd.data.views import AugSpec, augment
from camkd.errors import CamkdError
from camkd.evaluate import evaluate
from camkd.methods import Method, StudentOut
from camkd.progress import Bar, log
from camkd.runs import RunFolder
from camkd.sources import TeacherSource

CHECK_EVERY = 200  # steps between reads of the non-finite flag (and of the bar's loss) from the device
SMALL_LR_ARCHS = ("mobilenetv2", "shufflev1", "shufflev2")


def default_lr(arch: str) -> float:
    """The reference's learning rate: 0.01 for MobileNetV2/ShuffleV1/ShuffleV2, 0.05 otherwise."""
    return 0.01 if arch.lower() in SMALL_LR_ARCHS else 0.05


def lr_at(epoch: int, base_lr: float, decay_epochs: list[int], rate: float = 0.1) -> float:
    """Step schedule of the reference: epoch (1-based) e uses base * rate ** #{d : e > d}."""
    return base_lr * rate ** int(sum(epoch > d for d in decay_epochs))


@dataclass
class TrainData:
    """What the loop trains on: the training split (uint8 on the device), the test split, the views."""

    train: Dataset
    test: Dataset
    spec: AugSpec
    views: int


@dataclass
class Hooks:
    """For tests and benchmarks, never part of a user's config."""

    max_steps: int | None = None  # stop after this many steps in all
    on_step: Callable[[int, dict[str, Tensor]], None] | None = None  # (epoch, losses) after each step


@dataclass
class FitResult:
    epochs: list[dict] = field(default_factory=list)  # the per-epoch records written to metrics.jsonl
    best_top1: float = -1.0
    best_epoch: int = 0
    last_top1: float = float("nan")
    seconds: float = 0.0


def check_batch_size(batch_size: int, n: int) -> None:
    """An epoch must have at least one trainable batch."""
    if batch_size < 2:
        raise CamkdError(f"--batch-size must be at least 2 (BatchNorm needs 2 samples), got {batch_size}")
    if batch_size > n:
        raise CamkdError(f"--batch-size {batch_size} is larger than the {n} training samples, so no step would run; "
                         "lower --batch-size" + (" or raise --limit" if n < 64 else ""))


def fit(model: nn.Module, method: Method, source: TeacherSource, data: TrainData, *, optim: OptimConfig,
        run: RunConfig, folder: RunFolder, meta: dict, identity: dict, hooks: Hooks | None = None) -> FitResult:
    """Train ``model`` (and ``method``'s parameters) for ``optim.epochs``; checkpoints and metrics go to ``folder``.

    ``meta``: what every checkpoint records besides epoch and accuracy; ``identity``: the part of it
    a ``--resume`` must match.
    """
    hooks = hooks or Hooks()
    device = data.train.images.device
    amp = run.amp and device.type == "cuda"
    lr = optim.lr if optim.lr is not None else default_lr(meta["arch"])
    opt = torch.optim.SGD(list(model.parameters()) + list(method.parameters()), lr=lr, momentum=optim.momentum,
                          weight_decay=optim.weight_decay, nesterov=optim.nesterov)
    result = FitResult()
    start_epoch = 1
    if folder.resume:
        ckpt = folder.load_last(identity)
        model.load_state_dict(ckpt["model"])
        method.load_state_dict(ckpt.get("method", {}))
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch = ckpt["meta"]["epoch"] + 1
        result.best_top1, result.best_epoch = ckpt["best"]["top1"], ckpt["best"]["epoch"]
        result.last_top1 = ckpt["meta"]["accuracy"]
        log(f"resuming {folder.path} at epoch {start_epoch}")
    folder.start(resume_epoch=start_epoch - 1 if folder.resume else None)
    if optim.epochs > data.views:
        log(f"{optim.epochs} epochs over {data.views} views: epoch e uses view (e - 1) mod {data.views}")

    n, k = len(data.train), source.num_teachers
    step_total = 0
    t_run = time.perf_counter()
    for epoch in range(start_epoch, optim.epochs + 1):
        view = view_of_epoch(epoch, data.views)
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, lr, optim.lr_decay_epochs, optim.lr_decay_rate)
        model.train()
        method.train()
        windows = epoch_order(n, seed=run.seed, epoch=epoch, block_rows=source.block_rows, window_blocks=source.window_blocks)
        sums: dict[str, Tensor] = {}
        weight_sum = torch.zeros(k, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        finite = torch.ones((), dtype=torch.bool, device=device)
        seen = steps = 0
        t0 = time.perf_counter()
        with Bar(f"epoch {epoch}/{optim.epochs}", n, enabled=run.progress) as bar:
            for idx, batch_data in source.batches(view, windows, optim.batch_size, drop_last=optim.drop_last):
                it = torch.from_numpy(idx).to(device, non_blocking=True)
                x, params = augment(data.train.images, idx, data.spec, view, on_device=it)
                if steps == 0:
                    source.check_view(view, idx, params)
                tout = source.targets(it, x, batch_data)
                y = data.train.labels[it]
                if amp:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                    feats, logits = model(x, is_feat=True)
                    losses, info = method(StudentOut(logits=logits.float(), feats=feats), tout, y, epoch=epoch)
                loss = sum(losses.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for name, value in losses.items():
                    sums[name] = sums[name] + value.detach() if name in sums else value.detach().clone()
                finite &= torch.isfinite(loss.detach())
                if "teacher_weights" in info:
                    weight_sum += torch.as_tensor(info["teacher_weights"], device=device)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(idx)
                steps += 1
                step_total += 1
                if hooks.on_step is not None:
                    hooks.on_step(epoch, losses)
                status = None
                if steps % CHECK_EVERY == 0:  # one read every CHECK_EVERY steps
                    _check_finite(finite, epoch, steps, folder)
                    status = f"loss {float(sum(sums.values())) / steps:.3f}"
                bar.update(len(idx), status)
                if hooks.max_steps is not None and step_total >= hooks.max_steps:
                    break
        _check_finite(finite, epoch, steps, folder)
        train_time = time.perf_counter() - t0
        acc = evaluate(model, data.test, amp=amp)
        epoch_sums = {name: float(v) / max(steps, 1) for name, v in sums.items()}
        record = {"epoch": epoch, "view": view, "lr": opt.param_groups[0]["lr"],
                  **{f"loss_{name}": v for name, v in epoch_sums.items()},
                  "train_loss": sum(epoch_sums.values()), "train_acc": 100.0 * int(correct) / max(seen, 1),
                  "test_top1": acc["top1"], "test_top5": acc["top5"], "test_loss": acc["loss"],
                  "images_per_s": seen / max(train_time, 1e-9)}
        if k:
            record["teacher_weights"] = (weight_sum / max(steps, 1)).tolist()
        folder.write_metrics(record)
        result.epochs.append(record)
        result.last_top1 = acc["top1"]
        is_best = acc["top1"] > result.best_top1
        if is_best:
            result.best_top1, result.best_epoch = acc["top1"], epoch
        ckpt_meta = {**meta, "epoch": epoch, "accuracy": acc["top1"], "top5": acc["top5"], "camkd_version": camkd.__version__}
        folder.save({"model": model.state_dict(), "method": method.state_dict(), "optimizer": opt.state_dict(),
                     "meta": ckpt_meta, "best": {"top1": result.best_top1, "epoch": result.best_epoch}}, is_best=is_best)
        if run.progress:
            parts = " ".join(f"{name} {v:.3f}" for name, v in epoch_sums.items())
            log(f"{meta['arch']}/{meta.get('method', 'ce')} epoch {epoch}/{optim.epochs} (view {view}): {parts} | "
                f"train {record['train_acc']:.1f}% test top1 {acc['top1']:.2f}% top5 {acc['top5']:.2f}% "
                f"({record['images_per_s']:.0f} img/s)")
        if hooks.max_steps is not None and step_total >= hooks.max_steps:
            break
    result.seconds = time.perf_counter() - t_run
    return result


def _check_finite(finite: Tensor, epoch: int, steps: int, folder: RunFolder) -> None:
    if not bool(finite):
        raise CamkdError(f"the loss became NaN or infinite in epoch {epoch} (by step {steps}); lower --lr or the loss "
                         f"weights; the last good checkpoint is kept in {folder.path}")


def config_dict(cfg) -> dict:
    """A job config as plain data for checkpoints."""
    return asdict(cfg)
