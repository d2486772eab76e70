"""Content-addressed runs for the benchmarks: teachers, stores and students named by what made them.

A folder's name carries a sha256 of everything that decides its result, so a rerun, another
protocol or an added method finds what was already made and trains only what is new:

- a teacher: ``teachers/ARCH-HASH`` where HASH covers :func:`teacher_identity` of its
  ``TrainConfig`` (arch, the training data's fingerprint, limit, loader options, label noise rate
  and seed, the whole optimizer recipe with the learning rate resolved, init and augmentation
  seeds) and nothing about where or how it runs (folder, device, progress, resume);
- a store: ``stores/HASH.zarr`` over the teachers' checkpoint sha256s, the data, the views, the
  dtype, the features and the augmentation seed;
- a student: ``students/METHOD[-online]-sSEED-HASH`` over the store's hash, method, seed, and the
  student recipe (arch, optimizer, loss coefficients).

A run is finished when its ``metrics.jsonl`` holds every epoch and ``last.pth`` exists: it is
reused as it is. An unfinished one is continued with ``auto_resume`` (the run's own checkpoint
identity check still applies). The device is not part of any identity.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from camkd.config import DataConfig, RunConfig
from camkd.models import resolve_arch
from camkd.train import TrainConfig, resolve_recipe, teacher_optim

HASH_CHARS = 12


def digest(obj) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def decay_schedule(epochs: int) -> list[int]:
    """The reference's lr schedule (x0.1 after epochs 150, 180, 210 of 240) scaled to ``epochs``: 5 -> [3, 4]."""
    return sorted({max(1, round(epochs * f)) for f in (0.625, 0.75, 0.875)}) if epochs >= 4 else []


def data_fingerprint(dataset: str, *, data_dir: str | None, limit: int | None, options: dict | None = None,
                     _memo: dict = {}) -> str:  # noqa: B006 - a per-process memo: the same data is hashed once
    """The sha256 fingerprint of the (clean) training split's first ``limit`` samples."""
    from camkd.data import load_dataset

    key = (dataset, data_dir, limit, json.dumps(options or {}, sort_keys=True))
    if key not in _memo:
        _memo[key] = load_dataset(dataset, "train", data_dir=data_dir, limit=limit, **(options or {})).fingerprint
    return _memo[key]


def teacher_identity(cfg: TrainConfig, fingerprint: str) -> dict:
    """What decides a teacher's weights (``fingerprint``: the clean training data after its limit)."""
    arch = resolve_arch(cfg.arch)
    d = cfg.data
    optim = asdict(resolve_recipe(cfg.optim, d.dataset, arch))
    optim["lr_decay_epochs"] = sorted(optim["lr_decay_epochs"])
    noise = {"rate": d.label_noise, "seed": d.label_noise_seed} if d.label_noise else None
    return {"kind": "teacher", "arch": arch,
            "data": {"dataset": d.dataset, "fingerprint": fingerprint, "limit": d.limit, "options": d.options,
                     "label_noise": noise},
            "optim": optim, "seed": cfg.run.seed, "aug_seed": cfg.run.seed if cfg.aug_seed is None else cfg.aug_seed,
            "precision": cfg.run.precision, "sync_bn": cfg.run.sync_bn}


@dataclass
class TeacherSpec:
    """One teacher of a protocol: ``train-teacher -m ARCH -d DATASET --epochs E --lr-decay-epochs ... --seed S``
    with ``--limit`` and ``--label-noise`` as given and the train-teacher defaults otherwise."""

    arch: str
    role: str = ""  # what the protocol calls it (strong, weak, noisy); not part of the identity
    dataset: str = "fashion-mnist"
    epochs: int = 5
    lr_decay_epochs: list[int] | None = None  # None: decay_schedule(epochs)
    lr: float | None = None  # None: the recipe's (0.05, or 0.01 for MobileNetV2/ShuffleV1/V2)
    batch_size: int | None = None  # None: the dataset's teacher recipe (train.recipe)
    limit: int | None = None
    label_noise: float = 0.0
    label_noise_seed: int = 0
    seed: int = 0
    options: dict = field(default_factory=dict)  # dataset loader options (synthetic's num_samples)

    def train_config(self, out: str | Path | None = None, *, data_dir: str | None = None, device: str = "auto",
                     progress: bool = False) -> TrainConfig:
        optim = teacher_optim()
        optim.epochs, optim.batch_size, optim.lr = self.epochs, self.batch_size, self.lr
        optim.lr_decay_epochs = list(self.lr_decay_epochs) if self.lr_decay_epochs is not None else decay_schedule(self.epochs)
        return TrainConfig(arch=self.arch, optim=optim,
                           data=DataConfig(dataset=self.dataset, data_dir=data_dir, limit=self.limit, options=dict(self.options),
                                           label_noise=self.label_noise, label_noise_seed=self.label_noise_seed),
                           run=RunConfig(out=str(out) if out is not None else None, auto_resume=True, device=device,
                                         seed=self.seed, progress=progress))

    def identity(self, *, data_dir: str | None = None) -> dict:
        fp = data_fingerprint(self.dataset, data_dir=data_dir, limit=self.limit, options=self.options)
        return teacher_identity(self.train_config(data_dir=data_dir), fp)

    def folder(self, root: str | Path, *, data_dir: str | None = None) -> Path:
        """``ROOT/teachers/ARCH-HASH``."""
        return Path(root) / "teachers" / f"{resolve_arch(self.arch)}-{digest(self.identity(data_dir=data_dir))[:HASH_CHARS]}"


def history(run_dir: str | Path) -> list[dict]:
    """Every epoch's record in a run's metrics.jsonl (also those of earlier, resumed invocations)."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def finished(run_dir: str | Path, epochs: int) -> bool:
    """``last.pth`` exists and metrics.jsonl holds epochs 1..``epochs``."""
    return (Path(run_dir) / "last.pth").exists() and [r.get("epoch") for r in history(run_dir)] == list(range(1, epochs + 1))


def ensure_teacher(spec: TeacherSpec, root: str | Path, *, data_dir: str | None = None, device: str = "auto",
                   progress: bool = False) -> tuple[Path, bool]:
    """The teacher's folder, trained (or continued) unless finished; returns (folder, whether training ran)."""
    from camkd.train import train_teacher

    folder = spec.folder(root, data_dir=data_dir)
    if finished(folder, spec.epochs):
        return folder, False
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec.identity(data_dir=data_dir), indent=2, sort_keys=True) + "\n")
    train_teacher(spec.train_config(folder, data_dir=data_dir, device=device, progress=progress))
    return folder, True
