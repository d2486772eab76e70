"""`camkd train-teacher`: a teacher is the `ce` method with no teachers, trained by the one loop."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from camkd import dist
from camkd.checkpoint import load_checkpoint
from camkd.classmap import not_wnids
from camkd.config import DataConfig, OptimConfig, RunConfig
from camkd.data import check_dataset, dataset_kind, load_split
from camkd.data.noise import apply_label_noise, check_rate
from camkd.fit import FitResult, fit
from camkd.job import Hooks, TrainData, build_model, check_batch_size, init_from_published, resolve_lr, small_lr, start_run
from camkd.memory import check_batch_memory
from camkd.methods import create_method
from camkd.models import resolve_arch
from camkd.progress import log
from camkd.runs import RunFolder
from camkd.sources import NoTeachers
from camkd.weights import named_weights_spec

RECIPE_FIELDS = ("epochs", "batch_size", "lr_decay_epochs", "lr_decay_rate", "momentum", "weight_decay")
"""The optimizer options whose default depends on the kind of data (and ``lr``, which also depends on the arch)."""

FOLDER_LR_PER_256 = 0.1  # image folders: lr 0.1 per 256 images of the global batch (torchvision's reference)
FOLDER_SMALL_LR_PER_256 = 0.02  # ... and a fifth of it for the small-lr archs (job.small_lr), the reference's 0.01 / 0.05


def teacher_optim() -> OptimConfig:
    """train-teacher's options before the data is known: no nesterov, the last partial batch kept, and every value
    of :data:`RECIPE_FIELDS` and ``lr`` None, which :func:`resolve_recipe` fills from the dataset's recipe."""
    return replace(OptimConfig(nesterov=False, drop_last=False, lr=None), **dict.fromkeys(RECIPE_FIELDS))


def recipe(dataset: str) -> OptimConfig:
    """The recipe of ``dataset``'s kind (train-teacher's and distill's defaults), its ``lr`` left None (it depends on
    the arch or the batch). Only the values of :data:`RECIPE_FIELDS` are taken from it.

    In-memory 28-32 px data: the reference's (RepDistiller train_teacher.py): 240 epochs of batch 64, decay x0.1
    after 150/180/210, momentum 0.9, weight decay 5e-4. Image folders: torchvision's ImageNet reference: 90 epochs
    of batch 256, decay x0.1 after 30/60/80, momentum 0.9, weight decay 1e-4. Both: no nesterov, no dropped batch.
    """
    if dataset_kind(dataset) == "files":
        return OptimConfig(epochs=90, batch_size=256, lr=None, lr_decay_epochs=[30, 60, 80], lr_decay_rate=0.1,
                           momentum=0.9, weight_decay=1e-4, nesterov=False, drop_last=False)
    return OptimConfig(nesterov=False, drop_last=False, lr=None)


def resolve_recipe(optim: OptimConfig, dataset: str, arch: str, recorded: dict | None = None) -> OptimConfig:
    """``optim`` with every value left None taken from ``dataset``'s :func:`recipe`, and the lr made explicit:
    0.1 x batch / 256 for image folders (0.02 x batch / 256 for MobileNetV2/ShuffleV1/V2 and their tv: forms), the
    arch's default otherwise (0.05, or 0.01 for those: :func:`camkd.job.default_lr`).

    ``recorded``: a resumed run's recorded optimizer values (its checkpoint's ``options.optim``), which fill the values
    left None before the recipe does: a run continues with the numbers it trained with, also one made before a default
    changed (distill's on image folders did)."""
    base, recorded = recipe(dataset), recorded or {}
    keys = (*RECIPE_FIELDS, "lr")
    out = replace(optim, **{k: recorded[k] for k in keys if getattr(optim, k) is None and recorded.get(k) is not None})
    out = replace(out, **{k: getattr(base, k) for k in RECIPE_FIELDS if getattr(out, k) is None})
    if out.lr is None and dataset_kind(dataset) == "files":
        out = replace(out, lr=(FOLDER_SMALL_LR_PER_256 if small_lr(arch) else FOLDER_LR_PER_256) * out.batch_size / 256)
    return resolve_lr(out, arch)


@dataclass
class TrainConfig:
    """All options of a teacher run; saved into every checkpoint, with the recipe's values resolved (the optimizer
    values left None come from the dataset kind's recipe: :func:`resolve_recipe`)."""

    arch: str
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=teacher_optim)
    run: RunConfig = field(default_factory=lambda: RunConfig(seed=None))  # seed None: the trial's (:func:`resolve_seeds`)
    aug_seed: int | None = None  # seed of the augmentation views; None: the run's seed (recorded as that number)
    trial: int = 0  # names the default --out and, unless --seed is given, seeds the run

    def out_dir(self) -> Path:
        if self.run.out:
            return Path(self.run.out)
        return Path("runs") / "teachers" / f"{self.arch}_{self.data.dataset}_trial_{self.trial}"


def resolve_seeds(cfg: TrainConfig, options: dict, folder: RunFolder, *, main: bool = True) -> TrainConfig:
    """``cfg`` with both seeds made explicit numbers (so the checkpoint records them and a resume compares them).

    A seed given (``run.seed``, ``aug_seed`` not None) is used as given. One left None is, on a resume, the one the
    checkpoint recorded (a run made before ``--trial`` seeded runs recorded seed 0 whatever its trial, and continues
    with it); otherwise the seed is the trial (``--trial T`` alone: seed T, so trials differ) and the augmentation
    seed is the seed. ``options``: a resumed run's recorded options ({} for a new run)."""
    recorded = {"seed": (options.get("run") or {}).get("seed"), "aug_seed": options.get("aug_seed")}
    recorded = {k: v for k, v in recorded.items() if isinstance(v, int)}
    seed = cfg.run.seed if cfg.run.seed is not None else recorded.get("seed", cfg.trial)
    aug_seed = cfg.aug_seed if cfg.aug_seed is not None else recorded.get("aug_seed", seed)
    if main and cfg.run.seed is None and seed != cfg.trial:
        log(f"resuming with the seeds {folder.last} recorded, --seed {seed} --aug-seed {aug_seed} (not --trial {cfg.trial}'s: "
            "the run was started with --seed, or before --trial seeded runs)")
    return replace(cfg, run=replace(cfg.run, seed=seed), aug_seed=aug_seed)


def train_teacher(cfg: TrainConfig, *, hooks: Hooks | None = None) -> dict:
    """Train, evaluate each epoch, keep best/last checkpoints and metrics; returns a summary dict."""
    named = named_weights_spec(cfg.arch)  # tv:NAME@WEIGHTS / timm:NAME.TAG: fine-tune from published weights
    arch = resolve_arch(named[0] if named else cfg.arch)  # cheap checks first: nothing loads before the names are known good
    check_dataset(cfg.data.dataset)
    check_rate(cfg.data.label_noise)
    device, folder, world = start_run(cfg.run, cfg.out_dir())
    # the numbers the run uses, defaults made explicit so the checkpoint records them and a resume compares them: on a
    # resume the recorded ones first (a run from before a default changed continues with its own), then the recipe
    recorded = ((load_checkpoint(folder.last).get("meta") or {}).get("options") or {}) if folder.resume else {}
    optim = recorded.get("optim")
    cfg = replace(cfg, optim=resolve_recipe(cfg.optim, cfg.data.dataset, arch, optim if isinstance(optim, dict) else None))
    cfg = resolve_seeds(cfg, recorded, folder, main=world.main)

    d = cfg.data
    with dist.agree("loading the data"):
        train = load_split(d.dataset, "train", device=device, data_dir=d.data_dir, download=d.download, limit=d.limit,
                           **d.options)
        train, noise = apply_label_noise(train, d.label_noise, d.label_noise_seed)  # the test split stays clean
        test = load_split(d.dataset, "test", device=device, data_dir=d.data_dir, download=d.download, **d.options)
        check_batch_size(cfg.optim.batch_size, len(train), parts=world.size * cfg.optim.micro_batches)
        check_batch_memory(device, train, cfg.optim.batch_size // world.size, train=[arch], precision=cfg.run.precision)
    pretrained: dict = {}
    init = None
    if named and not folder.resume:  # a resumed run's weights come from its checkpoint
        def init(m):
            pretrained.update(init_from_published(m, cfg.arch, train))
    elif named:
        pretrained = ((load_checkpoint(folder.last).get("meta") or {}).get("pretrained")) or {}
    model = build_model(arch, train, cfg.run, init)
    if pretrained and world.main:
        rows = pretrained.get("class_rows")
        odd = not_wnids(train.class_names)
        why = f" ({odd[0]} is not an ImageNet wnid)" if not rows and odd and len(odd) < train.num_classes else ""
        head = (f"keeping the rows of the {len(rows)} ImageNet-1k classes of {train.name}" if rows else
                "keeping its classifier (the data's classes are its own)" if pretrained.get("classifier") == "published"
                else f"a new classifier for {train.name}'s {train.num_classes} classes{why}")
        if not folder.resume:
            log(f"fine-tuning from {pretrained['name']} ({pretrained['path']}, sha256 {pretrained['sha256'][:12]}), {head}")
    method = create_method("ce", num_classes=train.num_classes, num_teachers=1, student_feat_shapes=[],
                           teacher_feat_shapes={}).to(device)
    spec = train.aug_spec(cfg.aug_seed)
    meta = {"arch": model.arch, "method": "ce", "num_classes": train.num_classes, "in_channels": train.in_channels,
            "image_size": train.image_size, "dataset": train.name, "dataset_fingerprint": train.fingerprint,
            "num_train": len(train), "normalization": train.norm.to_dict(), "label_noise": noise, "options": asdict(cfg),
            "reopen": test.reopen.to_dict(),  # how evaluate opens its data again
            **({"pretrained": pretrained} if pretrained else {})}  # the published weights it started from
    identity = {k: meta[k] for k in ("arch", "dataset", "dataset_fingerprint", "label_noise")}
    r: FitResult = fit(model, method, NoTeachers(), TrainData(train, test, spec, views=cfg.optim.epochs),
                       optim=cfg.optim, run=cfg.run, folder=folder, meta=meta, identity=identity, hooks=hooks)
    return {"arch": model.arch, "out": str(folder.path), "epochs": cfg.optim.epochs, "last_top1": r.last_top1,
            "best_top1": r.best_top1, "best_epoch": r.best_epoch, "seconds": r.seconds, "history": r.epochs}
