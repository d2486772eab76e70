"""`camkd train-teacher`: a teacher is the `ce` method with no teachers, trained by the one loop."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from camkd import dist
from camkd.config import DataConfig, OptimConfig, RunConfig
from camkd.data import check_dataset, load_split
from camkd.data.noise import apply_label_noise, check_rate
from camkd.fit import FitResult, Hooks, TrainData, build_model, check_batch_size, fit, resolve_lr, start_run
from camkd.methods import create_method
from camkd.models import resolve_arch
from camkd.sources import NoTeachers


def teacher_optim() -> OptimConfig:
    """The reference's teacher recipe (RepDistiller train_teacher.py): no nesterov, the last partial batch kept."""
    return OptimConfig(nesterov=False, drop_last=False)


@dataclass
class TrainConfig:
    """All options of a teacher run; saved into every checkpoint."""

    arch: str
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=teacher_optim)
    run: RunConfig = field(default_factory=RunConfig)
    aug_seed: int | None = None  # seed of the augmentation views; None: the run's seed (recorded as that number)
    trial: int = 0

    def out_dir(self) -> Path:
        if self.run.out:
            return Path(self.run.out)
        return Path("runs") / "teachers" / f"{self.arch}_{self.data.dataset}_trial_{self.trial}"


def train_teacher(cfg: TrainConfig, *, hooks: Hooks | None = None) -> dict:
    """Train, evaluate each epoch, keep best/last checkpoints and metrics; returns a summary dict."""
    arch = resolve_arch(cfg.arch)  # cheap checks first: nothing loads before the names are known good
    # the numbers the run uses, defaulted ones made explicit, so the checkpoint records them and a resume compares them
    cfg = replace(cfg, optim=resolve_lr(cfg.optim, arch), aug_seed=cfg.run.seed if cfg.aug_seed is None else cfg.aug_seed)
    check_dataset(cfg.data.dataset)
    check_rate(cfg.data.label_noise)
    device, folder, world = start_run(cfg.run, cfg.out_dir())

    d = cfg.data
    with dist.agree("loading the data"):
        train = load_split(d.dataset, "train", device=device, data_dir=d.data_dir, download=d.download, limit=d.limit,
                           **d.options)
        train, noise = apply_label_noise(train, d.label_noise, d.label_noise_seed)  # the test split stays clean
        test = load_split(d.dataset, "test", device=device, data_dir=d.data_dir, download=d.download, **d.options)
        check_batch_size(cfg.optim.batch_size, len(train), parts=world.size * cfg.optim.micro_batches)
    model = build_model(arch, train, cfg.run)
    method = create_method("ce", num_classes=train.num_classes, num_teachers=1, student_feat_shapes=[],
                           teacher_feat_shapes={}).to(device)
    spec = train.aug_spec(cfg.aug_seed)
    meta = {"arch": model.arch, "method": "ce", "num_classes": train.num_classes, "in_channels": train.in_channels,
            "image_size": train.image_size, "dataset": train.name, "dataset_fingerprint": train.fingerprint,
            "num_train": len(train), "normalization": train.norm.to_dict(), "label_noise": noise, "options": asdict(cfg)}
    identity = {k: meta[k] for k in ("arch", "dataset", "dataset_fingerprint", "label_noise")}
    r: FitResult = fit(model, method, NoTeachers(), TrainData(train, test, spec, views=cfg.optim.epochs),
                       optim=cfg.optim, run=cfg.run, folder=folder, meta=meta, identity=identity, hooks=hooks)
    return {"arch": model.arch, "out": str(folder.path), "epochs": cfg.optim.epochs, "last_top1": r.last_top1,
            "best_top1": r.best_top1, "best_epoch": r.best_epoch, "seconds": r.seconds, "history": r.epochs}
