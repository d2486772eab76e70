"""Many processes on PyTorch's own engine: ``env://`` from torchrun, SLURM or Kubernetes; nothing with one.

camkd has no launcher. When WORLD_SIZE > 1 every command joins the process group that the
launcher describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): nccl on CUDA
(device = LOCAL_RANK), gloo on CPU. With one process every helper here is a no-op.

Failures: each rank validates the same input before any collective, so bad input fails on every
rank alike. A failure on one rank only (a file missing on one node) reaches the others at the
next :func:`agree` point, so no rank waits for the collective timeout. Under torchrun a worker
whose launcher is gone (killed with kill -9) stops too, rather than train on unattended.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as td

from camkd.errors import CamkdError

TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("CAMKD_DIST_TIMEOUT_MIN", "30")))
LAUNCHER_POLL_S = 0.2  # how often a torchrun worker checks that its launcher is still its parent


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def env_world() -> World:
    """The world the launcher describes (one process when nothing is set)."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise CamkdError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None


def current() -> World:
    """The world of this process: the joined group, or one process."""
    if td.is_available() and td.is_initialized():
        return World(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def init(device: torch.device) -> World:
    """Join the process group when launched with WORLD_SIZE > 1 (idempotent); returns the world."""
    w = env_world()
    if not w.active or td.is_initialized():
        return current()
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise CamkdError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set; launch with torchrun (or srun with them set)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(w.local_rank)
    # The launcher's store, with keys prefixed by the restart attempt: under torchrun --max-restarts a
    # restarted rank that starts faster than its peers must not read the previous attempt's addresses
    # (seen with gloo: "connectFullMesh failed ... Connection refused").
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), w.size,
                        is_master=not agent and w.rank == 0, timeout=TIMEOUT)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    _bind_no_group_at_import()
    bound = {"device_id": torch.device("cuda", w.local_rank)} if backend == "nccl" else {}  # barrier() knows its GPU
    td.init_process_group(backend=backend, store=td.PrefixStore(f"camkd/attempt_{attempt}", store), rank=w.rank,
                          world_size=w.size, timeout=TIMEOUT, **bound)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun (srun and Kubernetes manage their own processes)
        stop_with_launcher(w.rank)
    return current()


def _bind_no_group_at_import() -> None:
    """Import, before the group exists, the torch module that binds the default group at import.

    ``torch.distributed.nn.functional`` takes ``group=group.WORLD`` as its functions' defaults, evaluated at import.
    Imported after the group is made (``torch.use_deterministic_algorithms`` imports it, through inductor's config),
    those defaults hold the group for the rest of the process: :func:`close` then cannot free it, and its gloo
    worker threads outlive the interpreter. One of them still releasing the last collective's tensor (which
    takes the GIL) as the interpreter finalizes ends that rank in C++ ("terminate called without an active
    exception", SIGABRT) after its ``error:`` line. Imported first, the defaults are None (the default group).
    """
    import torch.distributed.nn.functional  # noqa: F401


def stop_with_launcher(rank: int) -> None:
    """Stop this process (exit code 1, one line) once its parent, the torchrun launcher, is gone.

    Killing torchrun with kill -9 leaves its workers running, reparented; without their launcher nobody
    restarts or stops them, so each one notices (a daemon thread polls the parent's pid) and exits at once,
    as if killed: the finished epochs' checkpoints are written atomically, so ``--resume`` continues the run.
    A rank whose peer stopped first fails in a collective: that error, too, ends in the one line.
    """
    launcher = os.getppid()

    def stop() -> None:
        print(f"rank {rank}: the torchrun launcher (pid {launcher}) is gone, so this rank stops; finished work is kept "
              "(train-teacher/distill: rerun with --resume)", file=sys.stderr, flush=True)
        os._exit(1)

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(LAUNCHER_POLL_S)
        stop()

    previous = sys.excepthook  # torch.distributed's, which prefixes the rank

    def excepthook(kind, value, tb) -> None:
        if os.getppid() != launcher:
            stop()
        previous(kind, value, tb)

    sys.excepthook = excepthook
    threading.Thread(target=watch, name="camkd-launcher-watch", daemon=True).start()


def device_for(device: torch.device) -> torch.device:
    """On CUDA under a launcher each process drives the GPU of its LOCAL_RANK."""
    w = env_world()
    if device.type == "cuda" and w.active and device.index is None:
        return torch.device("cuda", w.local_rank)
    return device


def close() -> None:
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def barrier() -> None:
    if current().active:
        td.barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op with one process); returns it."""
    if current().active:
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank, in place (no-op with one process)."""
    if current().active:
        with torch.no_grad():
            for t in tensors:
                td.broadcast(t, src=0)


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over ranks in one all-reduce, in place, exactly as DDP does: each rank's
    gradient times 1 / W, then summed (no-op with one process).

    Every rank must pass the same parameters in the same order (a function of the epoch, never of the rank's data).
    One without a gradient on this rank adds zeros, as DDP counts a parameter used on another rank only."""
    w = current()
    if not w.active or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).mul_(1.0 / w.size)
    td.all_reduce(flat, op=td.ReduceOp.SUM)
    for p, g, chunk in zip(params, grads, flat.split([p.numel() for p in params])):
        p.grad = g.copy_(chunk.view(g.shape))


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if current().active:
        for b in module.buffers():
            td.broadcast(b, src=0)


def _agree_on(error: BaseException | None, what: str) -> None:
    if not current().active:
        if error is not None:
            raise error
        return
    dev = torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=dev)
    td.all_reduce(flag, op=td.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(flag):
        raise CamkdError(f"another rank failed while {what} (its error is in its output); stopping")


@contextlib.contextmanager
def agree(what: str) -> Iterator[None]:
    """Run a step that may fail on some ranks only; afterwards every rank either goes on or stops together."""
    err: BaseException | None = None
    try:
        yield
    except (CamkdError, OSError) as e:
        err = e if isinstance(e, CamkdError) else CamkdError(f"{what}: {e.strerror or e}")
    _agree_on(err, what)
