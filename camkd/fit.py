"""The one training loop: teacher training and every distillation method run through :func:`fit`.

A job builds a model, a method (``ce`` for teacher training), a teacher source (none, a store,
or live teachers) and the data, then calls ``fit``. The loop has no mode branches and its step
never waits on the host: losses, accuracy counts and method diagnostics accumulate as device
tensors and are read once per epoch (a non-finite loss is caught there, or every
``CHECK_EVERY`` steps, and the run stops with the last good checkpoint kept).

Epoch e (1-based) uses view (e - 1) mod V and the seeded order of :mod:`camkd.data.order`, cut once
into global batches by its :class:`~camkd.epoch_plan.EpochPlan`, which feeds both the data and the
teacher source. What a job sets up before the loop is in :mod:`camkd.job`; the micro-batched student
and method one step trains, in :mod:`camkd.trainee`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import camkd
from camkd import dist
from camkd.config import OptimConfig, RunConfig
from camkd.data import DataSplit
from camkd.data.norm import normalize
from camkd.data.order import view_of_epoch
from camkd.epoch_plan import EpochPlan, rank_rows
from camkd.errors import CamkdError
from camkd.evaluate import evaluate
from camkd.job import Hooks, TrainData, run_precision
from camkd.methods import Method
from camkd.precision import zero_momentum_buffers
from camkd.progress import Bar, log
from camkd.runs import RunFolder
from camkd.sources import TeacherSource
from camkd.trainee import Trainee, compile_trainable_parts, wrap_ranks
from camkd.words import plural

CHECK_EVERY = 200  # steps between reads of the non-finite flag (and of the bar's loss) from the device


def lr_at(epoch: int, base_lr: float, decay_epochs: list[int], rate: float = 0.1) -> float:
    """Step schedule of the reference: epoch (1-based) e uses base * rate ** #{d : e > d}."""
    return base_lr * rate ** int(sum(epoch > d for d in decay_epochs))


@dataclass
class FitResult:
    epochs: list[dict] = field(default_factory=list)  # the per-epoch records written to metrics.jsonl
    best_top1: float = -1.0
    best_epoch: int = 0
    last_top1: float = float("nan")
    seconds: float = 0.0


def _slice_data(batch_data, sl: slice):
    """The rows ``sl`` of a source's per-batch data (streamed features per layer per teacher, or nothing)."""
    if isinstance(batch_data, dict):
        return {name: [a[sl] for a in per] for name, per in batch_data.items()}
    return batch_data


def fit(model: nn.Module, method: Method, source: TeacherSource, data: TrainData, *, optim: OptimConfig,
        run: RunConfig, folder: RunFolder, meta: dict, identity: dict, hooks: Hooks | None = None) -> FitResult:
    """Train ``model`` (and ``method``'s parameters) for ``optim.epochs``; checkpoints and metrics go to ``folder``.

    ``optim.lr``: resolved (:func:`camkd.job.resolve_lr`). ``meta``: what every checkpoint records besides epoch and
    accuracy; ``identity``: the part of it a ``--resume`` must match. Under torchrun each rank trains on its
    contiguous slice of every global batch (DDP); with ``optim.micro_batches`` = P each process splits its
    slice into P BatchNorm micro-batches whose gradients are averaged, so W ranks equal one process with W
    micro-batches: only the first slice's BatchNorm statistics are kept, as DDP keeps rank 0's.

    A resumed run that has already trained ``optim.epochs`` epochs (or more) is finished: it is reported
    in one line and returned as it is, with no file of the run folder touched.
    """
    loop = _Loop(model, method, source, data, optim=optim, run=run, folder=folder, meta=meta, hooks=hooks or Hooks())
    try:
        return loop.fit(identity)
    except BaseException:
        if loop.world.main:
            folder.discard_if_unfinished()  # a failure before the first checkpoint leaves no run folder
        raise
    finally:
        if loop.world.main:
            folder.close()


@dataclass
class EpochSums:
    """One epoch's sums on this process, kept on the device until :meth:`reduce` reads them once.

    ``counts``: correct predictions, samples seen, non-finite losses (float64); ``losses``: each named
    loss's sum over steps; ``weights``/``inter``: the teachers' weights (logit-level and CA-MKD's
    feature-level) summed over steps, ``inter_slices`` how many (micro-)batches added to ``inter``.
    """

    counts: Tensor
    losses: dict[str, Tensor]
    weights: Tensor
    inter: Tensor
    inter_slices: int = 0
    steps: int = 0

    @classmethod
    def zeros(cls, k: int, device: torch.device) -> EpochSums:
        return cls(torch.zeros(3, dtype=torch.float64, device=device), {}, torch.zeros(k, device=device),
                   torch.zeros(k, device=device))

    def reduce(self) -> EpochSums:
        """The sums over every rank, in one collective (as float64, on the device)."""
        names = sorted(self.losses)
        counts, *losses, weights, inter = all_sum_parts([self.counts, *(self.losses[n] for n in names), self.weights,
                                                         self.inter])
        return EpochSums(counts, dict(zip(names, losses)), weights, inter, self.inter_slices, self.steps)


def all_sum_parts(parts: list[Tensor]) -> list[Tensor]:
    """Sum each tensor over ranks (as float64) with one all-reduce of their concatenation; returns them in order."""
    flat = dist.all_sum(torch.cat([p.double().reshape(-1) for p in parts]))
    return [chunk.reshape(p.shape) for chunk, p in zip(flat.split([p.numel() for p in parts]), parts)]


class _Loop:
    """One :func:`fit` call's state, and its steps: resume, one epoch, evaluate, record, checkpoint."""

    def __init__(self, model: nn.Module, method: Method, source: TeacherSource, data: TrainData, *, optim: OptimConfig,
                 run: RunConfig, folder: RunFolder, meta: dict, hooks: Hooks) -> None:
        self.model, self.method, self.source, self.data = model, method, source, data
        self.optim, self.run, self.folder, self.meta, self.hooks = optim, run, folder, meta, hooks
        self.world = dist.current()
        self.device = data.train.labels.device
        self.precision = run_precision(run, self.device)
        self.parts = max(1, optim.micro_batches)  # BatchNorm micro-batches per process
        self.slices = self.world.size * self.parts  # slices of a global batch
        self.trainee = Trainee(model, method, self.precision.maybe_compile(model))
        compile_trainable_parts(method, self.precision)
        # fp16: torch's fused SGD, which reads the scaler's overflow flag on the device (the unfused step reads it on the
        # host); fp32 and bf16 keep the default implementation, so fp32 is exactly what it always was
        fused = {"fused": True} if self.precision.scales else {}
        self.opt = torch.optim.SGD(list(model.parameters()) + list(method.parameters()), lr=optim.lr,
                                   momentum=optim.momentum, weight_decay=optim.weight_decay, nesterov=optim.nesterov, **fused)
        zero_momentum_buffers(self.opt)  # every parameter's buffer from the first step (fused SGD takes no mix)
        self.scaler = self.precision.scaler()
        self.result = FitResult()
        self.step_total = 0
        self._net: nn.Module | None = None  # see network()

    def fit(self, identity: dict) -> FitResult:
        """Resume (or start), then per epoch: train, check the losses were finite, evaluate, record, checkpoint."""
        main = self.world.main
        start_epoch = self.resume(identity) if self.folder.resume else 1
        if start_epoch > self.optim.epochs:
            if main:
                done = start_epoch - 1
                log(f"{self.folder.path} is already finished: it has trained {plural(done, 'epoch')} (--epochs "
                    f"{self.optim.epochs}); nothing to do, no file changed (raise --epochs above {done} to train on)")
            return self.result
        if main:
            self.folder.start(resume_epoch=start_epoch - 1 if self.folder.resume else None)
            if self.optim.epochs > self.data.views:
                v = self.data.views
                log(f"{self.optim.epochs} epochs over {v} views: epoch e uses view (e - 1) mod {v}")
        test = _rank_slice(self.data.test, self.world)
        t_run = time.perf_counter()
        for epoch in range(start_epoch, self.optim.epochs + 1):
            t0 = time.perf_counter()
            sums = self.train_epoch(self.network(), epoch).reduce()
            _check_no_nonfinite(sums.counts[2], epoch, sums.steps, self.folder)
            train_time = time.perf_counter() - t0
            acc = self.evaluate(test)
            record = self.record(epoch, sums, acc, train_time)
            self.checkpoint(epoch, record, acc)
            if self.hooks.max_steps is not None and self.step_total >= self.hooks.max_steps:
                break
        dist.barrier()  # rank 0's last checkpoint is on disk before any rank returns
        self.result.seconds = time.perf_counter() - t_run
        return self.result

    def network(self) -> nn.Module:
        """The trainee, under torchrun wrapped in DDP once per run (:func:`camkd.trainee.wrap_ranks`): every parameter
        DDP holds gets a gradient at every step, so it never looks for unused ones, in any epoch."""
        if self._net is None:
            self._net = wrap_ranks(self.trainee, self.device)
        return self._net

    def resume(self, identity: dict) -> int:
        """Load the last checkpoint into the model, the method and the optimizer; returns the epoch to start.
        Every rank reads it (a shared filesystem), so all start equal."""
        ckpt = self.folder.load_last(identity, options=self.meta.get("options"))
        self.model.load_state_dict(ckpt["model"])
        self.method.load_state_dict(ckpt.get("method", {}))
        self.opt.load_state_dict(ckpt["optimizer"])
        zero_momentum_buffers(self.opt)  # a checkpoint from before every buffer was made lacks the late modules' ones
        if "scaler" in ckpt:  # fp16's loss scale and its growth tracker: the resumed run scales as the uninterrupted one
            self.scaler.load_state_dict(ckpt["scaler"])
        r = self.result
        r.best_top1, r.best_epoch = ckpt["best"]["top1"], ckpt["best"]["epoch"]
        r.last_top1 = ckpt["meta"]["accuracy"]
        start_epoch = ckpt["meta"]["epoch"] + 1
        if self.world.main and start_epoch <= self.optim.epochs:
            log(f"resuming {self.folder.path} at epoch {start_epoch}")
        return start_epoch

    def train_epoch(self, net: nn.Module, epoch: int) -> EpochSums:
        """One pass over this epoch's view in its seeded order; the sums stay on the device.

        The epoch's plan is made once: this rank's rows of its batches go to the split's ``view_batches`` (which
        may decode ahead), its batches to the source, and the two are zipped batch by batch. The rows are one array
        (:class:`~camkd.data.views.EpochRows`) copied to the device once: each step's indices are a slice of that
        copy, which an in-memory split gathers from too, so no step waits on a copy from the host."""
        data, source, optim, world = self.data, self.source, self.optim, self.world
        for group in self.opt.param_groups:
            group["lr"] = lr_at(epoch, optim.lr, optim.lr_decay_epochs, optim.lr_decay_rate)
        self.trainee.train()
        n = len(data.train)
        plan = EpochPlan.of(n, seed=self.run.seed, epoch=epoch, views=data.views, batch_size=optim.batch_size,
                            drop_last=optim.drop_last, slices=self.slices, block_rows=source.block_rows,
                            window_blocks=source.window_blocks)
        sums = EpochSums.zeros(source.num_teachers, self.device)
        rows = plan.rank_rows(world.rank, world.size)
        on_device = rows.on(self.device)  # this rank's indices of the whole epoch: one copy
        views = data.train.view_batches(data.spec, plan.view, rows, self.device)
        with Bar(f"epoch {epoch}/{optim.epochs}", n, enabled=self.run.progress and world.main) as bar:
            for k, (gidx, gdata, batch_views) in enumerate(zip(plan.batches, source.batches(plan), views)):
                mine = rank_rows(len(gidx), world.rank, world.size)
                self.step(net, epoch, plan.view, rows[k], on_device[rows.rows(k)], _slice_data(gdata, mine), batch_views,
                          sums)
                status = None
                if sums.steps % CHECK_EVERY == 0:  # one read every CHECK_EVERY steps, summed so every rank stops alike
                    _check_no_nonfinite(dist.all_sum(sums.counts[2].clone()), epoch, sums.steps, self.folder)
                    status = f"loss {float(sum(sums.losses.values())) / sums.steps:.3f}"
                bar.update(len(gidx), status)
                if self.hooks.max_steps is not None and self.step_total >= self.hooks.max_steps:
                    break
        return sums

    def step(self, net: nn.Module, epoch: int, view: int, idx, it: Tensor, batch_data, views, sums: EpochSums) -> None:
        """One optimizer step on this process's rows ``idx`` of a global batch (``it``: the same on the device, a slice
        of the epoch's one copy), whose uint8 views and their parameters are ``views`` (from the split's view_batches);
        adds to ``sums``.

        The parameters (an image folder's boxes, recomputed by the decoding workers) and pixel hashes are checked
        against what the store recorded (``check_view``) on purpose: that is the proof that the student sees the
        image the teachers saw (see :mod:`camkd.epoch_plan`)."""
        data, parts, device = self.data, self.parts, self.device
        images, params, hashes = views
        x = normalize(images, data.spec.norm)
        self.source.check_view(view, idx, params, hashes)  # host arrays only: no wait on the device
        tout = self.source.teacher_outputs(it, x, batch_data)
        y = data.train.labels[it]
        x = self.precision.prepare_input(x)
        self.opt.zero_grad(set_to_none=True)
        with self.precision.autocast():
            results = net(x, tout, y, epoch, parts, self.slices > 1)
        total = None
        m = len(idx) // parts
        for p, (losses, info, logits) in enumerate(results):
            loss = sum(losses.values())
            total = loss if total is None else total + loss
            for name, value in losses.items():
                v = value.detach() / parts
                sums.losses[name] = sums.losses[name] + v if name in sums.losses else v.clone()
            sums.counts[2] += (~torch.isfinite(loss.detach())).double()
            if "teacher_weights" in info:
                sums.weights += torch.as_tensor(info["teacher_weights"], device=device) / parts
            if "inter_weights" in info:  # known on the host without reading the tensor
                sums.inter += info["inter_weights"].to(device)
                sums.inter_slices += 1
            sums.counts[0] += (logits.detach().argmax(1) == y[p * m : (p + 1) * m]).sum()
            if self.hooks.on_step is not None:
                self.hooks.on_step(epoch, losses)
        self.scaler.scale(total / parts if parts > 1 else total).backward()  # fp32, bf16: no scaling (the loss itself)
        dist.average_gradients(self.method.trained_parameters(epoch))  # DDP holds the student's only (see wrap_ranks)
        self.trainee.keep_first_statistics()  # as under DDP, only the first slice's BatchNorm statistics persist
        self.scaler.step(self.opt)  # fp16: the step is skipped when a gradient overflowed; otherwise opt.step()
        self.scaler.update()
        sums.counts[1] += len(idx)
        sums.steps += 1
        self.step_total += 1

    def evaluate(self, test: DataSplit) -> dict[str, float]:
        """Test accuracy of rank 0's BatchNorm statistics (what is saved), on every rank's slice of the test split."""
        dist.broadcast_buffers(self.model)
        return evaluate(self.model, test, precision=self.precision)

    def record(self, epoch: int, sums: EpochSums, acc: dict[str, float], train_time: float) -> dict:
        """The epoch's line of metrics.jsonl: epoch, view, lr, loss_NAME per loss term, train_loss, train_acc,
        test_top1, test_top5, test_loss, images_per_s, world_size, and the teachers' mean weights where the method
        has them (teacher_weights; CA-MKD's inter_weights). Updates the result's last and best accuracy."""
        world = self.world
        steps_all = max(sums.steps * world.size, 1)
        losses = {name: float(v) / steps_all for name, v in sums.losses.items()}
        seen = float(sums.counts[1])
        record = {"epoch": epoch, "view": view_of_epoch(epoch, self.data.views), "lr": self.opt.param_groups[0]["lr"],
                  **{f"loss_{name}": v for name, v in losses.items()},
                  "train_loss": sum(losses.values()), "train_acc": 100.0 * float(sums.counts[0]) / max(seen, 1),
                  "test_top1": acc["top1"], "test_top5": acc["top5"], "test_loss": acc["loss"],
                  "images_per_s": seen / max(train_time, 1e-9), "world_size": world.size}
        if self.source.num_teachers and self.method.uses_teachers():  # ce ignores its teachers: no weights to report
            record["teacher_weights"] = (sums.weights / steps_all).tolist()
        if sums.inter_slices:  # the mean over this epoch's (micro-)batches on every rank
            record["inter_weights"] = (sums.inter / (sums.inter_slices * world.size)).tolist()
        r = self.result
        r.epochs.append(record)
        r.last_top1 = acc["top1"]
        if acc["top1"] > r.best_top1:
            r.best_top1, r.best_epoch = acc["top1"], epoch
        if self.run.progress and world.main:
            text = " ".join(f"{name} {v:.3f}" for name, v in losses.items())
            log(f"{self.meta['arch']}/{self.meta.get('method', 'ce')} epoch {epoch}/{self.optim.epochs} "
                f"(view {record['view']}): {text} | train {record['train_acc']:.1f}% test top1 {acc['top1']:.2f}% "
                f"top5 {acc['top5']:.2f}% ({record['images_per_s']:.0f} img/s)")
        return record

    def checkpoint(self, epoch: int, record: dict, acc: dict[str, float]) -> None:
        """Rank 0 appends the record and writes last.pth (and best.pth when this epoch is the best so far)."""
        if not self.world.main:
            return
        r = self.result
        self.folder.write_metrics(record)
        meta = {**self.meta, "epoch": epoch, "accuracy": acc["top1"], "top5": acc["top5"], "camkd_version": camkd.__version__}
        state = {"model": self.model.state_dict(), "method": self.method.state_dict(), "optimizer": self.opt.state_dict(),
                 "meta": meta, "best": {"top1": r.best_top1, "epoch": r.best_epoch}}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        self.folder.save(state, is_best=r.best_epoch == epoch)


def _rank_slice(test: DataSplit, world: dist.World) -> DataSplit:
    """This rank's disjoint, unpadded slice of the test split (evaluate() sums the counts over ranks)."""
    if not world.active:
        return test
    return test.subset(len(test) * world.rank // world.size, len(test) * (world.rank + 1) // world.size)


def _check_no_nonfinite(nonfinite: Tensor, epoch: int, steps: int, folder: RunFolder) -> None:
    """Stop the run when any loss so far was NaN or infinite (``nonfinite``: how many, as a device scalar)."""
    if bool(nonfinite):
        raise CamkdError(f"the loss became NaN or infinite in epoch {epoch} (by step {steps}); lower --lr or the loss "
                         f"weights; the last good checkpoint is kept in {folder.path}")
