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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import camkd
from camkd import dist
from camkd.config import OptimConfig, RunConfig
from camkd.data import Dataset
from camkd.data.order import epoch_order, view_of_epoch
from camkd.data.views import AugSpec, augment
from camkd.device import resolve_device, set_deterministic
from camkd.errors import CamkdError
from camkd.evaluate import evaluate
from camkd.methods import Method, StudentOut, TeacherOut
from camkd.models import create_model
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


def check_batch_size(batch_size: int, n: int, *, parts: int = 1) -> None:
    """An epoch must have at least one trainable batch, and each of the ``parts`` slices of a batch
    (ranks x micro-batches) at least 2 samples, all of one size."""
    if batch_size < 2:
        raise CamkdError(f"--batch-size must be at least 2 (BatchNorm needs 2 samples), got {batch_size}")
    if batch_size % parts or batch_size // parts < 2:
        raise CamkdError(f"--batch-size {batch_size} does not split into {parts} equal slices of at least 2 "
                         f"(ranks x --micro-batches); use a multiple of {2 * parts}")
    if batch_size > n:
        raise CamkdError(f"--batch-size {batch_size} is larger than the {n} training samples, so no step would run; "
                         "lower --batch-size" + (" or raise --limit" if n < 64 else ""))


class Trainee(nn.Module):
    """The student and the method's trainable parts: one module, so DDP syncs both.

    One call trains on this process's share of a global batch, split into ``parts`` BatchNorm
    micro-batches; batch-level statistics of the method (AEKD) are summed over the parts and,
    under torchrun, over the ranks, so every slice sees the global batch's value.
    """

    def __init__(self, model: nn.Module, method: Method) -> None:
        super().__init__()
        self.model, self.method = model, method
        self.saved: list[tuple[nn.Module, list[Tensor]]] = []  # BatchNorm buffers after the first part's forward

    def forward(self, x: Tensor, tout: TeacherOut, y: Tensor, epoch: int, parts: int, split: bool) -> list[tuple]:
        m = len(y) // parts
        outs = []
        self.saved = []
        for p in range(parts):
            if p == 1:
                self.saved.append((self.model, _buffers(self.model)))
            sl = slice(p * m, (p + 1) * m)
            feats, logits = self.model(x[sl], is_feat=True)
            outs.append((sl, _slice_out(tout, sl), feats, logits))
        stats = None
        if split:  # the global batch is split (ranks or micro-batches): its statistics are sums over the slices
            partial = [self.method.batch_stats(logits.float(), t) for _, t, _, logits in outs]
            if partial[0] is not None:
                stats = partial[0]
                for q in partial[1:]:
                    stats = stats + q
                stats = dist.all_sum(stats)
        results = []
        for p, (sl, t, feats, logits) in enumerate(outs):
            if p == 1:
                self.saved.append((self.method, _buffers(self.method)))
            losses, info = self.method(StudentOut(logits=logits.float(), feats=feats), t, y[sl], epoch=epoch, stats=stats)
            results.append((losses, info, logits))
        return results


def _wrap(trainee: Trainee, device: torch.device) -> nn.Module:
    """DDP over the ranks (it averages gradients and broadcasts rank 0's buffers at each forward)."""
    if not dist.current().active:
        return trainee
    from torch.nn.parallel import DistributedDataParallel as DDP

    has_params = any(p.requires_grad for p in trainee.method.parameters())  # e.g. CA-MKD's Embeds, unused in epoch 1
    return DDP(trainee, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=has_params)


def _buffers(module: nn.Module) -> list[Tensor]:
    return [b.detach().clone() for b in module.buffers()]


def _restore(module: nn.Module, saved: list[Tensor]) -> None:
    with torch.no_grad():
        for b, v in zip(module.buffers(), saved):
            b.copy_(v)


def _slice_data(batch_data, sl: slice):
    """The rows ``sl`` of a source's per-batch data (streamed features per layer per teacher, or nothing)."""
    if isinstance(batch_data, dict):
        return {name: [a[sl] for a in per] for name, per in batch_data.items()}
    return batch_data


def start_run(run: RunConfig, out: Path) -> tuple[torch.device, RunFolder, dist.World]:
    """What every training job does first, on every rank before any collective: the device, the run
    folder's checks (nothing is created yet), then joining torchrun's group and the kernel settings."""
    device = dist.device_for(resolve_device(run.device))
    if run.sync_bn and device.type != "cuda":
        raise CamkdError("--sync-bn needs CUDA (DDP refuses SyncBatchNorm on CPU); drop --sync-bn or use --device cuda")
    folder = RunFolder(out, resume=run.resume, auto_resume=run.auto_resume)
    folder.check()
    world = dist.init(device)
    set_deterministic(run.deterministic)
    return device, folder, world


def build_model(arch: str, train: Dataset, run: RunConfig) -> nn.Module:
    """The model to train, seeded by ``run.seed``, on the data's device (channels-last with --amp, SyncBN with --sync-bn)."""
    device = train.images.device
    torch.manual_seed(run.seed)
    model = create_model(arch, num_classes=train.num_classes, in_channels=train.in_channels).to(device)
    if device.type == "cuda" and run.amp:
        model = model.to(memory_format=torch.channels_last)
    if run.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def fit(model: nn.Module, method: Method, source: TeacherSource, data: TrainData, *, optim: OptimConfig,
        run: RunConfig, folder: RunFolder, meta: dict, identity: dict, hooks: Hooks | None = None) -> FitResult:
    """Train ``model`` (and ``method``'s parameters) for ``optim.epochs``; checkpoints and metrics go to ``folder``.

    ``meta``: what every checkpoint records besides epoch and accuracy; ``identity``: the part of it
    a ``--resume`` must match. Under torchrun each rank trains on its contiguous slice of every
    global batch (DDP); with ``optim.micro_batches`` = P each process splits its slice into P
    BatchNorm micro-batches whose gradients are averaged, so W ranks equal one process with W
    micro-batches: only the first slice's BatchNorm statistics are kept, as DDP keeps rank 0's.
    """
    try:
        return _fit(model, method, source, data, optim=optim, run=run, folder=folder, meta=meta, identity=identity,
                    hooks=hooks or Hooks())
    except BaseException:
        if dist.current().main:
            folder.discard_if_unfinished()  # a failure before the first checkpoint leaves no run folder
        raise


def _fit(model: nn.Module, method: Method, source: TeacherSource, data: TrainData, *, optim: OptimConfig,
         run: RunConfig, folder: RunFolder, meta: dict, identity: dict, hooks: Hooks) -> FitResult:
    world = dist.current()
    main = world.main
    device = data.train.images.device
    amp = run.amp and device.type == "cuda"
    parts = max(1, optim.micro_batches)
    slices = world.size * parts
    lr = optim.lr if optim.lr is not None else default_lr(meta["arch"])
    trainee = Trainee(model, method)
    opt = torch.optim.SGD(list(model.parameters()) + list(method.parameters()), lr=lr, momentum=optim.momentum,
                          weight_decay=optim.weight_decay, nesterov=optim.nesterov)
    result = FitResult()
    start_epoch = 1
    if folder.resume:  # every rank reads the checkpoint (a shared filesystem), so all start equal
        ckpt = folder.load_last(identity, options=meta.get("options"))
        model.load_state_dict(ckpt["model"])
        method.load_state_dict(ckpt.get("method", {}))
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch = ckpt["meta"]["epoch"] + 1
        result.best_top1, result.best_epoch = ckpt["best"]["top1"], ckpt["best"]["epoch"]
        result.last_top1 = ckpt["meta"]["accuracy"]
        if main:
            log(f"resuming {folder.path} at epoch {start_epoch}")
    if main:
        folder.start(resume_epoch=start_epoch - 1 if folder.resume else None)
        if optim.epochs > data.views:
            log(f"{optim.epochs} epochs over {data.views} views: epoch e uses view (e - 1) mod {data.views}")
    net = _wrap(trainee, device)
    test = _rank_slice(data.test, world)

    n, k = len(data.train), source.num_teachers
    step_total = 0
    t_run = time.perf_counter()
    for epoch in range(start_epoch, optim.epochs + 1):
        view = view_of_epoch(epoch, data.views)
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, lr, optim.lr_decay_epochs, optim.lr_decay_rate)
        trainee.train()
        windows = epoch_order(n, seed=run.seed, epoch=epoch, block_rows=source.block_rows, window_blocks=source.window_blocks)
        sums: dict[str, Tensor] = {}
        weight_sum = torch.zeros(k, device=device)
        inter_sum, inter_count = torch.zeros(k, device=device), 0  # camkd's feature-level weights (epoch 2 on): sum, slices
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # correct, seen, non-finite losses
        steps = 0
        t0 = time.perf_counter()
        with Bar(f"epoch {epoch}/{optim.epochs}", n, enabled=run.progress and main) as bar:
            for gidx, gdata in source.batches(view, windows, optim.batch_size, drop_last=optim.drop_last):
                if len(gidx) % slices or len(gidx) // slices < 2:  # a trailing batch that does not split evenly
                    continue
                per = len(gidx) // world.size
                mine = slice(world.rank * per, (world.rank + 1) * per)
                idx, batch_data = gidx[mine], _slice_data(gdata, mine)
                it = torch.from_numpy(idx).to(device, non_blocking=True)
                x, params = augment(data.train.images, idx, data.spec, view, on_device=it)
                if steps == 0:
                    source.check_view(view, idx, params)
                tout = source.targets(it, x, batch_data)
                y = data.train.labels[it]
                if amp:
                    x = x.contiguous(memory_format=torch.channels_last)
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                    results = net(x, tout, y, epoch, parts, slices > 1)
                total = None
                for p, (losses, info, logits) in enumerate(results):
                    loss = sum(losses.values())
                    total = loss if total is None else total + loss
                    for name, value in losses.items():
                        v = value.detach() / parts
                        sums[name] = sums[name] + v if name in sums else v.clone()
                    stats[2] += (~torch.isfinite(loss.detach())).double()
                    if "teacher_weights" in info:
                        weight_sum += torch.as_tensor(info["teacher_weights"], device=device) / parts
                    if "inter_weights" in info:  # known on the host without reading the tensor
                        inter_sum += info["inter_weights"].to(device)
                        inter_count += 1
                    stats[0] += (logits.detach().argmax(1) == y[p * (per // parts) : (p + 1) * (per // parts)]).sum()
                    if hooks.on_step is not None:
                        hooks.on_step(epoch, losses)
                (total / parts if parts > 1 else total).backward()
                for module, saved in trainee.saved:  # as under DDP, only the first slice's BatchNorm statistics persist
                    _restore(module, saved)
                opt.step()
                stats[1] += len(idx)
                steps += 1
                step_total += 1
                status = None
                if steps % CHECK_EVERY == 0:  # one read every CHECK_EVERY steps, summed so every rank stops alike
                    _check_finite(dist.all_sum(stats[2].clone()), epoch, steps, folder)
                    status = f"loss {float(sum(sums.values())) / steps:.3f}"
                bar.update(len(gidx), status)
                if hooks.max_steps is not None and step_total >= hooks.max_steps:
                    break
        # one reduction per epoch: every rank's sums, counts and weights
        names = sorted(sums)
        flat = dist.all_sum(torch.cat([stats, torch.stack([sums[nm].double() for nm in names]) if names else stats[:0],
                                       weight_sum.double(), inter_sum.double()]))
        stats, epoch_loss = flat[:3], flat[3:3 + len(names)]
        weight_mean, inter_mean = flat[3 + len(names):3 + len(names) + k], flat[3 + len(names) + k:]
        _check_finite(stats[2], epoch, steps, folder)
        train_time = time.perf_counter() - t0
        dist.broadcast_buffers(model)  # evaluate rank 0's BatchNorm statistics everywhere (what is saved)
        acc = evaluate(model, test, amp=amp)
        steps_all = max(steps * world.size, 1)
        epoch_sums = {nm: float(v) / steps_all for nm, v in zip(names, epoch_loss.tolist())}
        seen = float(stats[1])
        record = {"epoch": epoch, "view": view, "lr": opt.param_groups[0]["lr"],
                  **{f"loss_{nm}": v for nm, v in epoch_sums.items()},
                  "train_loss": sum(epoch_sums.values()), "train_acc": 100.0 * float(stats[0]) / max(seen, 1),
                  "test_top1": acc["top1"], "test_top5": acc["top5"], "test_loss": acc["loss"],
                  "images_per_s": seen / max(train_time, 1e-9), "world_size": world.size}
        if k and method.uses_teachers():  # ce ignores its teachers: no weights to report
            record["teacher_weights"] = (weight_mean / steps_all).tolist()
        if inter_count:  # the mean over this epoch's (micro-)batches on every rank
            record["inter_weights"] = (inter_mean / (inter_count * world.size)).tolist()
        result.epochs.append(record)
        result.last_top1 = acc["top1"]
        is_best = acc["top1"] > result.best_top1
        if is_best:
            result.best_top1, result.best_epoch = acc["top1"], epoch
        if main:
            folder.write_metrics(record)
            ckpt_meta = {**meta, "epoch": epoch, "accuracy": acc["top1"], "top5": acc["top5"], "camkd_version": camkd.__version__}
            folder.save({"model": model.state_dict(), "method": method.state_dict(), "optimizer": opt.state_dict(),
                         "meta": ckpt_meta, "best": {"top1": result.best_top1, "epoch": result.best_epoch}}, is_best=is_best)
        if run.progress and main:
            parts_txt = " ".join(f"{nm} {v:.3f}" for nm, v in epoch_sums.items())
            log(f"{meta['arch']}/{meta.get('method', 'ce')} epoch {epoch}/{optim.epochs} (view {view}): {parts_txt} | "
                f"train {record['train_acc']:.1f}% test top1 {acc['top1']:.2f}% top5 {acc['top5']:.2f}% "
                f"({record['images_per_s']:.0f} img/s)")
        if hooks.max_steps is not None and step_total >= hooks.max_steps:
            break
    dist.barrier()  # rank 0's last checkpoint is on disk before any rank returns
    result.seconds = time.perf_counter() - t_run
    return result


def _slice_out(t: TeacherOut, sl: slice) -> TeacherOut:
    if sl == slice(0, t.logits.shape[0]) or t.logits.shape[0] == 0:
        return t
    return t.slice(sl)


def _rank_slice(test: Dataset, world: dist.World) -> Dataset:
    """This rank's disjoint, unpadded slice of the test split (evaluate() sums the counts over ranks)."""
    if not world.active:
        return test
    bounds = [len(test) * r // world.size for r in range(world.size + 1)]
    sl = slice(bounds[world.rank], bounds[world.rank + 1])
    return Dataset(test.name, test.split, test.images[sl], test.labels[sl], test.num_classes, test.norm)


def _check_finite(finite: Tensor, epoch: int, steps: int, folder: RunFolder) -> None:
    if bool(finite):  # the number of non-finite losses so far
        raise CamkdError(f"the loss became NaN or infinite in epoch {epoch} (by step {steps}); lower --lr or the loss "
                         f"weights; the last good checkpoint is kept in {folder.path}")


def config_dict(cfg) -> dict:
    """A job config as plain data for checkpoints."""
    return asdict(cfg)
