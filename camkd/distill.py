"""`camkd distill`: train a student from a teacher store, or with --online from live teachers.

This module only assembles the run: the data (from the store, or the dataset for --online
without a store), the teacher source, the student and the method; the one loop in fit.py
trains it. Both sources feed the same loop, which is what the cache == online tests compare.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from camkd import dist
from camkd.checkpoint import load_checkpoint
from camkd.config import DataConfig, LossConfig, OptimConfig, RunConfig
from camkd.data import DataSplit, check_dataset, load_split
from camkd.errors import CamkdError
from camkd.fit import fit
from camkd.job import Hooks, TrainData, build_model, check_batch_size, run_precision, start_run
from camkd.memory import check_batch_memory
from camkd.methods import METHODS, create_method, method_uses_teachers, required_layers, resolve_loss
from camkd.models import resolve_arch
from camkd.progress import log
from camkd.runs import RunFolder
from camkd.sources import LiveTeachers, StoreTeachers, TeacherSource, check_layers, streamed_window
from camkd.store import Expect, TeacherStore, open_store
from camkd.store.location import parse_location
from camkd.store.reader import load_cached_data
from camkd.teachers import fit_teachers, load_teachers
from camkd.train import RECIPE_FIELDS, resolve_recipe


def distill_optim() -> OptimConfig:
    """distill's options before the data is known: nesterov, the last partial batch dropped, and every value of
    :data:`~camkd.train.RECIPE_FIELDS` and ``lr`` None, which the run fills from its data's recipe (train-teacher's,
    :func:`camkd.train.recipe`: the reference's on 28-32 px data, torchvision's on image folders)."""
    return replace(OptimConfig(lr=None), **dict.fromkeys(RECIPE_FIELDS))


@dataclass
class DistillConfig:
    """All options of a distillation run; saved into every checkpoint."""

    arch: str
    method: str = "camkd"
    cache: str | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=distill_optim)  # values left None: the data's recipe (_resolved)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset=None))  # with a store: only data_dir is used
    online: bool = False
    teachers: list[str] = field(default_factory=list)
    aug_seed: int = 0  # --online without a store: seed of the views (a store fixes its own)
    feature_memory_mb: float = 4096.0  # hold a view's features in memory up to this size; stream beyond
    window_blocks: int = 4  # streamed features: blocks shuffled together

    def out_dir(self) -> Path:
        if self.run.out:
            return Path(self.run.out)
        mode = "online" if self.online else "cached"
        return Path("runs") / "students" / f"{self.arch}_{self.method}_{mode}_s{self.run.seed}"


def _check_options(cfg: DistillConfig) -> tuple[str, tuple[str, ...]]:
    """Every cheap check, before anything is loaded. Returns (arch, the feature layers the method needs)."""
    arch = resolve_arch(cfg.arch)
    METHODS.resolve(cfg.method)
    needed = required_layers(cfg.method, cfg.loss)
    if cfg.cache is None and not cfg.online:
        raise CamkdError("give --cache STORE (made by cache-teachers), or --online with --teacher CKPT ...")
    if cfg.online and not cfg.teachers:
        raise CamkdError("--online needs the teachers: --teacher CKPT (repeat for each)")
    if cfg.teachers and not cfg.online:
        raise CamkdError("--teacher is used only with --online (a store already names its teachers); add --online or drop --teacher")
    if cfg.cache and cfg.data.limit is not None:
        raise CamkdError("--limit applies only to --online without --cache: a store fixes the training samples "
                         "(cache a subset with 'cache-teachers --limit N')")
    if cfg.cache and cfg.aug_seed != DistillConfig.aug_seed:
        raise CamkdError(f"--aug-seed applies only to --online without --cache: the store fixes its own views (their seed "
                         f"is in 'camkd cache-info {cfg.cache}'); drop --aug-seed")
    if cfg.cache and "image_size" in cfg.data.options:
        raise CamkdError("--image-size applies only to --online without --cache: a store fixes the size of its views "
                         f"('camkd cache-info {cfg.cache}' shows it); drop --image-size")
    if cfg.online and not cfg.cache:
        if not cfg.data.dataset:
            raise CamkdError("--online without --cache needs --dataset")
        check_dataset(cfg.data.dataset)
    return arch, needed


def _store_data(store: TeacherStore, cfg: DistillConfig, device: torch.device) -> TrainData:
    """The store's data, checked against it once, by load_cached_data (its fingerprint and augmentation)."""
    name = store.description.dataset.name
    if cfg.data.dataset and cfg.data.dataset != name:
        raise CamkdError(f"{store.path} caches dataset '{name}', not '{cfg.data.dataset}'; use a store made for {cfg.data.dataset}")
    train, test, spec = load_cached_data(store, data_dir=cfg.data.data_dir, workers=cfg.data.options.get("workers"))
    return TrainData(train.to(device), test.to(device), spec, store.views)


def _dataset_data(cfg: DistillConfig, device: torch.device) -> TrainData:
    d = cfg.data
    train = load_split(d.dataset, "train", device=device, data_dir=d.data_dir, download=d.download, limit=d.limit, **d.options)
    test = load_split(d.dataset, "test", device=device, data_dir=d.data_dir, download=d.download, **d.options)
    return TrainData(train, test, train.aug_spec(cfg.aug_seed), views=cfg.optim.epochs)


def _live_source(cfg: DistillConfig, store: TeacherStore | None, layers: tuple[str, ...], train: DataSplit,
                 device: torch.device) -> tuple[LiveTeachers, dict, list[str]]:
    teachers = load_teachers(cfg.teachers, device=device, distinct=store is None)  # a store fixes its teachers already
    check_batch_memory(device, train, cfg.optim.batch_size // dist.current().size, train=[cfg.arch], infer=[t.model for t in teachers],
                       precision=cfg.run.precision, size_option="--image-size" if store is None else "cache-teachers --image-size")
    shas = [t.sha256 for t in teachers]
    if store is not None and shas != [t.sha256 for t in store.description.teachers]:
        raise CamkdError(f"--teacher checkpoints differ from the ones {store.path} was made with; pass the same ones in order")
    fit_teachers(teachers, train, say=log if dist.current().main else None)
    with torch.inference_mode():
        tf = [t.model(torch.zeros(_image_shape(1, train), device=device), is_feat=True)[0] for t in teachers]
    index = {"penultimate": -2, **{f"hint{i}": i for i in range(len(tf[0]))}}
    shapes = {name: [tuple(f[i].shape[1:]) for f in tf] for name, i in index.items()
              if all(-len(f) <= i < len(f) and f[i].ndim == 4 for f in tf)}
    check_layers(shapes, layers, "the teachers' feature list")
    block_rows, window_blocks = 1, None
    if store is not None:  # follow the cached run's order exactly, streamed or not
        block_rows = store.block_rows
        window_blocks = streamed_window(store, layers, cfg.feature_memory_mb, cfg.window_blocks)
    live = LiveTeachers(teachers, layers, index, block_rows=block_rows, window_blocks=window_blocks,
                        precision=run_precision(cfg.run, device))  # the teachers in the run's precision and layout
    return live, shapes, shas


def _image_shape(n: int, data: DataSplit) -> tuple[int, int, int, int]:
    """The shape of ``n`` images of ``data``: [n, C, S, S]."""
    return (n, data.in_channels, data.image_size, data.image_size)


def _student_shapes(model: nn.Module, train: DataSplit, device: torch.device) -> list[tuple[int, ...]]:
    model.eval()
    with torch.no_grad():
        feats, _ = model(torch.zeros(_image_shape(2, train), device=device), is_feat=True)
    model.train()
    return [tuple(f.shape[1:]) for f in feats]


def _recorded_options(cfg: DistillConfig) -> dict:
    """The options a checkpoint records; a local store's path made absolute, so `camkd evaluate --split train`
    finds the store from any working directory."""
    options = asdict(cfg)
    where = parse_location(cfg.cache) if cfg.cache else None
    if where is not None and where.is_local:
        options["cache"] = str(Path(where.path).absolute())
    return options


def _resolved(cfg: DistillConfig, arch: str, dataset: str, folder: RunFolder) -> DistillConfig:
    """``cfg`` with every defaulted number the run uses made explicit, so the checkpoint records them and a resume
    compares them: the optimizer values left None from ``dataset``'s recipe (on a resume, the ones the checkpoint
    recorded first: a run made before distill followed the recipe on image folders continues with its numbers), the
    method's beta."""
    recorded = None
    if folder.resume:
        recorded = ((load_checkpoint(folder.last).get("meta") or {}).get("options") or {}).get("optim")
    optim = resolve_recipe(cfg.optim, dataset, arch, recorded if isinstance(recorded, dict) else None)
    return replace(cfg, optim=optim, loss=resolve_loss(cfg.method, cfg.loss))


def _warn_kd_on_topk(cfg: DistillConfig, store: TeacherStore | None) -> None:
    """kd averages the teachers' logits, which a top-k store does not hold: say once that its loss is approximate."""
    if cfg.method == "kd" and store is not None and store.logits_spec.kind == "topk" and store.num_teachers > 1 \
            and dist.current().main:
        log(f"warning: kd averages the teachers' logits, which the top-k store {store.path} does not hold: a class one "
            "teacher kept and another did not is averaged with the other's tail spread evenly, an error not bounded by "
            "the tail mass; prefer --method avg or camkd on a top-k store")


def distill(cfg: DistillConfig, *, hooks: Hooks | None = None) -> dict:
    """Train the student; returns a summary (accuracies, per-epoch records)."""
    arch, layers = _check_options(cfg)
    device, folder, world = start_run(cfg.run, cfg.out_dir())

    source: TeacherSource
    with dist.agree("opening the store and loading the data"):
        store = open_store(cfg.cache, Expect()) if cfg.cache else None  # Expect(): a complete store
        cfg = _resolved(cfg, arch, store.description.dataset.name if store is not None else cfg.data.dataset, folder)
        data = _store_data(store, cfg, device) if store is not None else _dataset_data(cfg, device)
        check_batch_size(cfg.optim.batch_size, len(data.train), parts=world.size * cfg.optim.micro_batches)
        check_batch_memory(device, data.train, cfg.optim.batch_size // world.size, train=[arch], precision=cfg.run.precision,
                           size_option="--image-size" if store is None else "cache-teachers --image-size (a store of smaller views)")
        if cfg.online:
            source, shapes, shas = _live_source(cfg, store, layers, data.train, device)
        else:
            shapes = {layer: store.feature_shapes(layer) for layer in store.layers}
            check_layers(shapes, layers, str(cfg.cache))
            source = StoreTeachers(store, layers, device, memory_budget_mb=cfg.feature_memory_mb,
                                   window_blocks=cfg.window_blocks,
                                   temperature=cfg.loss.kd_T if method_uses_teachers(cfg.method) else None,
                                   sample_name=data.train.sample_name)
            shas = [t.sha256 for t in store.description.teachers]
    _warn_kd_on_topk(cfg, store)

    train = data.train
    model = build_model(arch, train, cfg.run)
    method = create_method(cfg.method, num_classes=train.num_classes, num_teachers=source.num_teachers,
                           student_feat_shapes=_student_shapes(model, train, device),
                           teacher_feat_shapes={layer: shapes[layer] for layer in layers}, loss=cfg.loss).to(device)
    meta = {"arch": model.arch, "method": cfg.method, "num_classes": train.num_classes, "in_channels": train.in_channels,
            "image_size": train.image_size, "dataset": train.name, "dataset_fingerprint": train.fingerprint,
            "teachers": shas, "options": _recorded_options(cfg), "reopen": data.test.reopen.to_dict()}  # evaluate's
    records = source.teachers if cfg.online else store.description.teachers  # Teacher / TeacherRecord: the same fields
    named = [{"weights": t.weights, "class_rows": None if t.class_rows is None else list(t.class_rows)} for t in records]
    if any(v is not None for d in named for v in d.values()):  # published weights by name, ImageNet-1k rows kept
        meta["teacher_weights"] = named
    identity = {k: meta[k] for k in ("arch", "method", "dataset_fingerprint", "teachers")}
    r = fit(model, method, source, data, optim=cfg.optim, run=cfg.run, folder=folder, meta=meta, identity=identity, hooks=hooks)
    return {"arch": model.arch, "method": cfg.method, "out": str(folder.path), "last_top1": r.last_top1,
            "best_top1": r.best_top1, "best_epoch": r.best_epoch, "seconds": r.seconds, "history": r.epochs,
            "mode": "online" if cfg.online else "cached",
            "staged_bytes": source.staged_bytes if isinstance(source, StoreTeachers) else 0}  # this rank's remote reads
