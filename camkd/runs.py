"""A run folder: checked before any work, created when the run starts, resumable.

It holds ``last.pth`` (model, method, optimizer, meta, best), ``best.pth`` (model, method,
meta), each written atomically with a ``.sha256`` sidecar, and ``metrics.jsonl`` (one JSON
line per epoch). Only the process that owns the run (rank 0 under torchrun) writes here.

When the optional ``tensorboard`` package is installed (``pip install camkd[tensorboard]``),
every metrics line is also written as TensorBoard scalars (tag = the metrics key, step = the
epoch; lists as ``key/i``) to an event file under ``tb/``; without it nothing is imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import struct
import time
from pathlib import Path

from camkd.checkpoint import atomic_save, load_checkpoint
from camkd.errors import CamkdError


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


class RunFolder:
    """The folder of one training run (teacher or student)."""

    def __init__(self, path: str | Path, *, resume: bool, auto_resume: bool = False) -> None:
        self.path = Path(path)
        self.last, self.best = self.path / "last.pth", self.path / "best.pth"
        self.resume = resume or (auto_resume and self.last.exists())
        self.metrics = self.path / "metrics.jsonl"
        self.tb: TensorBoardLog | None = None

    def check(self) -> None:
        """Before any work: the folder can be written, and it holds a run exactly when resuming. Creates nothing."""
        if self.path.exists() and not self.path.is_dir():
            raise CamkdError(f"--out {self.path} is a file, not a folder; choose another --out")
        base = _nearest_existing(self.path)
        if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
            raise CamkdError(f"cannot write to --out {self.path}: {base} is not writable; choose a writable folder")
        if self.path.is_dir() and not self.last.exists():
            if (self.path / "zarr.json").exists():
                raise CamkdError(f"--out {self.path} is a Zarr store, not a run folder; choose another --out")
            runs = sorted(p.name for p in self.path.iterdir() if (p / "metrics.jsonl").is_file())
            if runs:
                raise CamkdError(f"--out {self.path} holds runs ({', '.join(runs[:3])}{', ...' if len(runs) > 3 else ''}); "
                                 f"give the run a folder of its own, e.g. --out {self.path / 'NAME'}")
        if self.last.exists() and not self.resume:
            raise CamkdError(f"{self.path} already holds a run (last.pth); add --resume to continue it or choose another --out")
        if self.resume and not self.last.exists():
            raise CamkdError(f"--resume: no checkpoint {self.last}; run without --resume to start")

    def start(self, resume_epoch: int | None) -> None:
        """Create the folder and the metrics file (on resume: drop lines past the checkpoint's epoch)."""
        try:
            self._made = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self.tb = TensorBoardLog.open(self.path / "tb", resume_epoch)
            if resume_epoch is None or not self.metrics.exists():
                self.metrics.write_text("")
                return
            keep = [line for line in self.metrics.read_text().splitlines()
                    if line.strip() and json.loads(line).get("epoch", 0) <= resume_epoch]
            self.metrics.write_text("".join(line + "\n" for line in keep))
        except OSError as e:
            raise CamkdError(f"cannot write to --out {self.path}: {e.strerror or e}; choose a writable folder") from None

    def discard_if_unfinished(self) -> None:
        """After a failure before a new run's first checkpoint: remove what :meth:`start` made (no empty run folder
        is left behind). A resumed run, or one with a checkpoint, keeps everything."""
        if self.resume or self.last.exists() or not hasattr(self, "_made"):
            return
        if self._made:
            shutil.rmtree(self.path, ignore_errors=True)
        else:  # the folder was there before (empty of runs, as check() made sure): only our files go
            self.metrics.unlink(missing_ok=True)
            shutil.rmtree(self.path / "tb", ignore_errors=True)

    def load_last(self, identity: dict, options: dict | None = None) -> dict:
        """The last checkpoint, refused unless it was made with the same ``identity`` (arch, data, teachers, ...)
        and the same trajectory-shaping ``options`` (:data:`FIXED_OPTIONS`; a checkpoint's saved options)."""
        ckpt = load_checkpoint(self.last)
        meta = ckpt.get("meta") or {}
        for key, want in identity.items():
            if meta.get(key) != want:
                raise CamkdError(f"--resume: {self.last} was made with {key}={_differs(meta.get(key), want)}; "
                                 "use the same options or another --out")
        old = meta.get("options") or {}
        for path, flag in FIXED_OPTIONS.items():
            have, want = _dig(old, path), _dig(options or {}, path)
            if have is not _MISSING and want is not _MISSING and have != want:
                raise CamkdError(f"--resume: {self.last} was made with {flag} {_short(have)}, this run has {_short(want)}; "
                                 f"resume with the same {flag} (only --epochs may grow; device, ranks and --micro-batches may "
                                 "change) or choose another --out")
        if "optimizer" not in ckpt:
            raise CamkdError(f"--resume: {self.last} holds no optimizer state; it is not a camkd last checkpoint")
        return ckpt

    def write_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            self.tb.write(record)

    def save(self, state: dict, *, is_best: bool) -> None:
        """``last.pth`` always (with optimizer), ``best.pth`` when this epoch is the best so far (without)."""
        if is_best:
            atomic_save({k: v for k, v in state.items() if k not in ("optimizer", "best")}, self.best)
        atomic_save(state, self.last)


# Options a resumed run must share with the run it continues: they shape the whole trajectory, and the
# checkpoint records them as the run's. --epochs may grow; the device, the number of ranks and
# --micro-batches (equal to ranks, bit for bit), --deterministic, progress and the folder may change.
FIXED_OPTIONS = {
    ("run", "seed"): "--seed", ("optim", "batch_size"): "--batch-size", ("optim", "lr"): "--lr",
    ("optim", "lr_decay_epochs"): "--lr-decay-epochs", ("optim", "lr_decay_rate"): "lr_decay_rate",
    ("optim", "momentum"): "momentum", ("optim", "weight_decay"): "weight_decay", ("optim", "nesterov"): "--nesterov",
    ("optim", "drop_last"): "drop_last", ("aug_seed",): "--aug-seed", ("loss", "gamma"): "--gamma",
    ("loss", "alpha"): "--alpha", ("loss", "beta"): "--beta", ("loss", "kd_T"): "--kd-T", ("loss", "aekd_C"): "--aekd-C",
    ("loss", "hint_layer"): "--hint-layer",
}
_MISSING = object()


def _dig(d: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return _MISSING
        d = d[key]
    return d


def _differs(have, want) -> str:
    """'X, this run has Y', short, with the difference visible (two long lists cut alike would look equal)."""
    if isinstance(have, list) and isinstance(want, list):
        if len(have) != len(want):
            return f"{_entries(have)} {_short(have)}, this run has {_entries(want)} {_short(want)}"
        i = next(i for i, (a, b) in enumerate(zip(have, want)) if a != b)
        return f"entry {i + 1} {_short(have[i])}, this run has {_short(want[i])}"
    return f"{_short(have)}, this run has {_short(want)}"


def _entries(x: list) -> str:
    return f"{len(x)} entr{'y' if len(x) == 1 else 'ies'}"


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def tensorboard_available() -> bool:
    """Whether the optional ``tensorboard`` package is installed (looked up, not imported)."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """One TensorBoard event file per start of a run, appended to (and closed) once per epoch.

    No writer thread and no open file between epochs. A resumed run starts a new file with a
    ``SessionLog.START`` at the first new epoch, so TensorBoard drops the older file's scalars of
    the epochs being redone, as the metrics file drops their lines.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def open(cls, folder: Path, resume_epoch: int | None) -> TensorBoardLog | None:
        if not tensorboard_available():
            return None
        try:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        except Exception as e:  # an installed but broken tensorboard (e.g. a protobuf it does not work with) stops no run
            from camkd.progress import log

            log(f"tensorboard is installed but does not import ({type(e).__name__}: {e}); no TensorBoard scalars for this run")
            return None

        folder.mkdir(exist_ok=True)
        now = time.time()
        log = cls(folder / f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}.camkd")
        events = [Event(wall_time=now, file_version="brain.Event:2")]
        if resume_epoch is not None:
            events.append(Event(wall_time=now, step=resume_epoch + 1, session_log=SessionLog(status=SessionLog.START)))
        log._append(events)
        return log

    def write(self, record: dict) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = []
        for key, v in record.items():
            if key == "epoch":
                continue
            items = [(f"{key}/{i}", x) for i, x in enumerate(v)] if isinstance(v, list | tuple) else [(key, v)]
            values += [Summary.Value(tag=tag, simple_value=float(x)) for tag, x in items
                       if isinstance(x, int | float) and not isinstance(x, bool)]
        self._append([Event(wall_time=time.time(), step=int(record["epoch"]), summary=Summary(value=values))])

    def _append(self, events: list) -> None:
        with open(self.path, "ab") as f:
            f.write(b"".join(_record(e.SerializeToString()) for e in events))


def _record(data: bytes) -> bytes:
    """One TFRecord: length, its masked crc32c, the data, its masked crc32c (tensorboard's writer imports far more)."""
    import google_crc32c  # zarr's crc32c

    def masked(b: bytes) -> bytes:
        crc = google_crc32c.value(b)
        return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)

    head = struct.pack("<Q", len(data))
    return head + masked(head) + data + masked(data)
