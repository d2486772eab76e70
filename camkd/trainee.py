"""The student and the method's trainable parts as one module, trained in BatchNorm micro-batches.

This is what makes W ranks equal one process with W micro-batches (``--micro-batches W``): one call
splits this process's share of a global batch into parts, keeps only the first part's BatchNorm
statistics (as DDP keeps rank 0's) and sums the method's batch-level statistics (AEKD's) over the parts
and the ranks. The loop (:mod:`camkd.fit`) calls it once per step, wrapped in DDP under torchrun.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from camkd import dist
from camkd.methods import Method, StudentOut, TeacherOut
from camkd.precision import Precision


class Trainee(nn.Module):
    """The student and the method's trainable parts: one module, whose call DDP wraps (see :func:`wrap_ranks`).

    One call trains on this process's share of a global batch, split into ``parts`` BatchNorm
    micro-batches; batch-level statistics of the method (AEKD) are summed over the parts and,
    under torchrun, over the ranks, so every slice sees the global batch's value.
    """

    def __init__(self, model: nn.Module, method: Method, student: Callable | None = None) -> None:
        """``student``: what runs the model's forward (its compiled form under --compile), kept out of the module's
        children so that no state_dict gains ``_orig_mod.`` keys; the model itself by default."""
        super().__init__()
        self.model, self.method = model, method
        self.__dict__["student"] = student if student is not None else model
        self.saved: list[tuple[nn.Module, list[Tensor]]] = []  # BatchNorm buffers after the first part's forward

    def forward(self, x: Tensor, tout: TeacherOut, y: Tensor, epoch: int, parts: int, split: bool) -> list[tuple]:
        m = len(y) // parts
        outs = []
        self.saved = []
        for p in range(parts):
            if p == 1:
                self.saved.append((self.model, _buffers(self.model)))
            sl = slice(p * m, (p + 1) * m)
            feats, logits = self.student(x[sl], is_feat=True)
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

    def keep_first_statistics(self) -> None:
        """Put back the BatchNorm buffers the first part left (called after the backward), as DDP keeps rank 0's."""
        with torch.no_grad():
            for module, saved in self.saved:
                for b, v in zip(module.buffers(), saved):
                    b.copy_(v)


def wrap_ranks(trainee: Trainee, device: torch.device) -> nn.Module:
    """DDP over the ranks: it averages the student's gradients and broadcasts rank 0's buffers (the student's and the
    method's) at each forward; the trainee itself outside torchrun.

    The method's parameters are left out of it: CA-MKD's Embeds and FitNet's ConvRegs get no gradient in epoch 1, so
    DDP would have to look for unused parameters after every backward (``find_unused_parameters``, which notes once
    per rank from epoch 2 that it found none, a C++ warning Python cannot filter). The loop averages their gradients
    itself (:meth:`camkd.fit._Loop.step`); like DDP, rank 0's values are broadcast here first."""
    if not dist.current().active:
        return trainee
    from torch.nn.parallel import DistributedDataParallel as DDP

    own = {id(p) for p in trainee.method.parameters()}
    DDP._set_params_and_buffers_to_ignore_for_model(trainee, [n for n, p in trainee.named_parameters() if id(p) in own])
    dist.broadcast_tensors(list(trainee.method.parameters()))
    return DDP(trainee, device_ids=[device.index] if device.type == "cuda" else None)


def compile_trainable_parts(method: Method, precision: Precision) -> None:
    """Under --compile, the method's trainable modules (CA-MKD's embeddings, FitNet's regressors: the members of
    its module lists, or a child module with parameters) compiled in place, so its state_dict keeps its keys.

    ``nn.Module.compile`` compiles the module's call, so a method must reach these modules only by calling them, with
    all their work in ``forward`` (an Embed's resize to its teacher's size included): a method calling another of their
    methods would run it eagerly (tests/test_resize.py checks the call is the whole path)."""
    if not precision.compile:
        return
    for child in method.children():
        for part in (child if isinstance(child, nn.ModuleList) else [child]):
            if any(True for _ in part.parameters()):
                precision.compile_in_place(part)


def _buffers(module: nn.Module) -> list[Tensor]:
    return [b.detach().clone() for b in module.buffers()]


def _slice_out(t: TeacherOut, sl: slice) -> TeacherOut:
    if sl == slice(0, t.logits.shape[0]) or t.logits.shape[0] == 0:
        return t
    return t.slice(sl)
