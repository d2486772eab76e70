"""A run folder: checked before any work, created when the run starts, resumable.

It holds ``last.pth`` (model, method, optimizer, meta, best), ``best.pth`` (model, method,
meta), each written atomically with a ``.sha256`` sidecar, and ``metrics.jsonl`` (one JSON
line per epoch). Only the process that owns the run (rank 0 under torchrun) writes here.

When the optional ``tensorboard`` package is installed (``pip install camkd[tensorboard]``),
every metrics line is also written as TensorBoard scalars (tag = the metrics key, step = the
epoch; lists as ``key/i``) by ``torch.utils.tensorboard.SummaryWriter`` under ``tb/``; without
it no TensorBoard file is written (said once per process) and nothing of it is imported.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
from pathlib import Path

from camkd.checkpoint import atomic_save, load_checkpoint
from camkd.errors import CamkdError
from camkd.progress import log


def _outermost_missing(path: Path) -> Path:
    """The highest folder of ``path``'s that does not exist yet (``path`` itself when its parent exists)."""
    p = path.absolute()
    while not p.parent.exists() and p.parent != p:
        p = p.parent
    return p


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
        self.resume_asked, self.auto_resume = resume, auto_resume
        self.resume = resume or (auto_resume and self.last.exists())
        self.metrics = self.path / "metrics.jsonl"
        self.tb: TensorBoardLog | None = None

    def check(self) -> None:
        """Before any work: the folder can be written, and it holds a run exactly when resuming. Creates nothing."""
        if self.resume_asked and self.auto_resume:
            raise CamkdError("--resume and --auto-resume together: --auto-resume already resumes when --out holds a run "
                             "(and starts one when not); give one of them")
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
            # the outermost folder this run creates (--out's parents too): removed whole if the run fails early
            self._made = None if self.path.exists() else _outermost_missing(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            if resume_epoch is None:  # a new run in a folder a run killed before its first checkpoint left: its scalars go
                shutil.rmtree(self.path / "tb", ignore_errors=True)
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
        if self._made is not None:
            shutil.rmtree(self._made, ignore_errors=True)
        else:  # the folder was there before (empty of runs, as check() made sure): only our files go
            self.metrics.unlink(missing_ok=True)
            shutil.rmtree(self.path / "tb", ignore_errors=True)

    def load_last(self, identity: dict, options: dict | None = None) -> dict:
        """The last checkpoint, refused unless it was made with the same ``identity`` (arch, data, teachers, ...)
        and the same trajectory-shaping ``options`` (:data:`FIXED_OPTIONS`; a checkpoint's saved options)."""
        ckpt = load_checkpoint(self.last)
        meta = ckpt.get("meta") or {}
        # named identity (arch, method, ...) first, then the options, then what options only shape (the data's
        # fingerprint, which --label-noise-seed changes, say): a differing option is named, not described
        named = [key for key in identity if key not in DERIVED]
        self._check_identity(meta, identity, named)
        old = meta.get("options") or {}
        for path, flag in FIXED_OPTIONS.items():
            have, want = _dig(old, path), _dig(options or {}, path)
            if have is _MISSING:
                have = OPTION_BEFORE.get(path, _MISSING)
            if have is not _MISSING and want is not _MISSING and have != want:
                raise CamkdError(f"--resume: {self.last} was made with {_given(flag, have)}, this run has {_given(flag, want)}; "
                                 f"resume with the same {flag} (only --epochs may grow; device, ranks and --micro-batches may "
                                 "change) or choose another --out")
        self._check_identity(meta, identity, [key for key in identity if key in DERIVED])
        if "optimizer" not in ckpt:
            raise CamkdError(f"--resume: {self.last} holds no optimizer state; it is not a camkd last checkpoint")
        return ckpt

    def _check_identity(self, meta: dict, identity: dict, keys: list[str]) -> None:
        for key in keys:
            want = identity[key]
            if meta.get(key) != want:
                what = IDENTITY.get(key, key)
                raise CamkdError(f"--resume: {self.last} was made with {what} {_differs(meta.get(key), want)}; "
                                 "use the same options or another --out")

    def close(self) -> None:
        """At the end of a run (also a failed one): the TensorBoard writer flushes and stops."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None

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
# --micro-batches (equal to ranks, bit for bit), --deterministic, --channels-last and --compile (other kernels, the
# same math), progress and the folder may change.
FIXED_OPTIONS = {
    ("run", "seed"): "--seed", ("run", "precision"): "--precision", ("optim", "batch_size"): "--batch-size", ("optim", "lr"): "--lr",
    ("optim", "lr_decay_epochs"): "--lr-decay-epochs", ("optim", "lr_decay_rate"): "lr_decay_rate",
    ("optim", "momentum"): "momentum", ("optim", "weight_decay"): "weight_decay", ("optim", "nesterov"): "--nesterov",
    ("optim", "drop_last"): "drop_last", ("aug_seed",): "--aug-seed", ("loss", "gamma"): "--gamma",
    ("loss", "alpha"): "--alpha", ("loss", "beta"): "--beta", ("loss", "kd_T"): "--kd-T", ("loss", "aekd_C"): "--aekd-C",
    ("loss", "hint_layer"): "--hint-layer", ("data", "limit"): "--limit", ("data", "label_noise"): "--label-noise",
    ("data", "label_noise_seed"): "--label-noise-seed",
}
# The value a checkpoint from before an option existed trained with (otherwise an option it lacks is not compared).
OPTION_BEFORE = {("run", "precision"): "fp32"}
# What a checkpoint's identity keys are, in the user's words (the options that make them).
IDENTITY = {
    "arch": "--arch", "method": "--method", "dataset": "--dataset", "label_noise": "--label-noise",
    "dataset_fingerprint": "other training data (from the --cache store, or from --dataset, --limit and --data-dir)",
    "teachers": "other teachers (from the --cache store, or from --teacher)",
}
DERIVED = ("label_noise", "dataset_fingerprint", "teachers")  # identity that options shape: checked after them
_MISSING = object()


def _dig(d: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return _MISSING
        d = d[key]
    return d


def _given(flag: str, value) -> str:
    """'--limit 64', or 'no --limit' for an option left out (None), as a user would say it."""
    if value is None:
        return f"no {flag}"
    return f"{flag} {value if isinstance(value, str) else _short(value)}"  # a word as typed: --precision bf16


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
    """``repr(v)`` cut to about 40 characters; a cut string keeps its closing quote."""
    s = repr(v)
    if len(s) <= 40:
        return s
    return repr(v[:12] + "...") if isinstance(v, str) else s[:37] + "..."


def tensorboard_available() -> bool:
    """Whether the optional ``tensorboard`` package is installed (looked up, not imported)."""
    return importlib.util.find_spec("tensorboard") is not None


@functools.cache
def _no_tensorboard_note() -> None:
    """Said once per process: a run writes no TensorBoard files without the optional package."""
    log("tensorboard is not installed, so no TensorBoard scalars are written (metrics.jsonl has every epoch); "
        "pip install 'camkd[tensorboard]' for them")


class TensorBoardLog:
    """A run's scalars through ``torch.utils.tensorboard.SummaryWriter``, flushed once per epoch.

    A resumed run starts a new event file with ``purge_step`` = the first new epoch, so TensorBoard
    drops the older file's scalars of the epochs being redone, as the metrics file drops their lines.
    """

    def __init__(self, writer) -> None:
        self.writer = writer

    @classmethod
    def open(cls, folder: Path, resume_epoch: int | None) -> TensorBoardLog | None:
        if not tensorboard_available():
            _no_tensorboard_note()
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # an installed but broken tensorboard (e.g. a protobuf it does not work with) stops no run
            log(f"tensorboard is installed but does not import ({type(e).__name__}: {e}); no TensorBoard scalars for this run")
            return None
        return cls(SummaryWriter(str(folder), purge_step=None if resume_epoch is None else resume_epoch + 1))

    def write(self, record: dict) -> None:
        """The record's numbers (lists as ``key/i``) at step = its epoch."""
        step = int(record["epoch"])
        for key, v in record.items():
            if key == "epoch":
                continue
            items = [(f"{key}/{i}", x) for i, x in enumerate(v)] if isinstance(v, list | tuple) else [(key, v)]
            for tag, x in items:
                if isinstance(x, int | float) and not isinstance(x, bool):
                    self.writer.add_scalar(tag, float(x), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
