"""The `camkd` command line: each command parses options and calls one importable function.

Every input error is one line on stderr starting with ``error:`` and exit code 2: our own
(CamkdError) and the parser's (bad range, missing option, unknown choice) alike.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from camkd.cli_bench import bench_app
from camkd.cli_shared import (
    DataDirOpt,
    DatasetChoice,
    DeviceChoice,
    DeviceOpt,
    DtypeChoice,
    MethodChoice,
    OneLineErrors,
    PlainHelp,
    PrecisionChoice,
    QuietOpt,
    as_str,
    choices,
    friendly,
    out_prefix,
    show,
)
from camkd.config import DataConfig, LossConfig, OptimConfig, RunConfig
from camkd.distill import DistillConfig
from camkd.errors import CamkdError
from camkd.evaluate import BATCH_SIZE as EVAL_BATCH_SIZE
from camkd.store.layout import COMPRESSORS, FEATURE_DTYPES
from camkd.store.verify import SAMPLE as VERIFY_SAMPLE

app = typer.Typer(
    name="camkd",
    cls=OneLineErrors,
    help="Confidence-Aware Multi-Teacher Knowledge Distillation from cached teacher outputs.",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(bench_app, name="bench")

FeatureDtypeChoice = choices("FeatureDtype", list(FEATURE_DTYPES))
CompressorChoice = choices("Compressor", list(COMPRESSORS))


def _teacher_optim() -> OptimConfig:
    from camkd.train import teacher_optim

    return teacher_optim()


_O, _R, _L, _TO = OptimConfig(), RunConfig(), LossConfig(), _teacher_optim()  # the defaults, stated once in config.py / train.py
_DISTILL_METHOD = MethodChoice(DistillConfig.method)  # stated once in distill.py

# Options shared across commands (huggingface_hub style aliases).
DownloadOpt = Annotated[bool, typer.Option("--download", help="Download the dataset if missing (needs network).")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Use only the first N training samples.", min=1)]
ImageSizeOpt = Annotated[Optional[int], typer.Option("--image-size", metavar="N", help="Image folders: train and evaluate "
                         "on N x N views [default: 224 for imagefolder, 64 for tinyimagenet].")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", metavar="N", help="Image folders: processes decoding the "
                       "images, 0 = this one [default: the CPUs, at most 8].")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the model's init and the sample order.")]
DeterministicOpt = Annotated[bool, typer.Option("--deterministic", help="Deterministic kernels (bit-exact reruns).")]
PrecisionOpt = Annotated[PrecisionChoice, typer.Option("--precision", help="Autocast of the forward passes: bf16, or fp16 "
                         "with a gradient scaler; fp32 is exact.")]
ChannelsLastOpt = Annotated[bool, typer.Option("--channels-last", help="Models and input batches in channels-last (NHWC) "
                            "memory format.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the model being trained (and a distillation "
                       "method's trainable parts); needs a C++ compiler on CPU, Triton on CUDA.")]
SyncBnOpt = Annotated[bool, typer.Option("--sync-bn", help="SyncBatchNorm across torchrun's ranks (CUDA only).")]
MicroOpt = Annotated[int, typer.Option("--micro-batches", min=1, help="Split each process's share of a batch into "
                                       "this many BatchNorm micro-batches (W ranks == 1 process with W).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pth.")]
AutoResumeOpt = Annotated[bool, typer.Option("--auto-resume", help="Continue from OUT/last.pth if it exists, else start "
                                             "(for torchrun --max-restarts and preemptible jobs).")]
TeacherOpt = Annotated[list[str], typer.Option("--teacher", "-t", metavar="CKPT", help="Teacher checkpoint: PATH (camkd), ARCH=PATH "
                                               "(reference), or published weights by name: tv:NAME@WEIGHTS (torchvision's, "
                                               "e.g. tv:resnet50@IMAGENET1K_V2) or timm:NAME.TAG (e.g. timm:resnet50.a1_in1k); "
                                               "repeat for each teacher.")]
OldSeedOpt = Annotated[Optional[int], typer.Option("--seed", hidden=True)]


def _renamed(old: str, new: str, value) -> None:
    if value is not None:
        raise CamkdError(f"{old} is now {new} here (it only ever set that seed); use {new} {value}")


def _epochs(values: list[str]) -> list[int]:
    """--lr-decay-epochs given repeated (150, 180) or comma-separated (150,180,210), as before."""
    try:
        out = [int(v) for text in values for v in text.split(",") if v.strip()]
    except ValueError:
        raise CamkdError(f"--lr-decay-epochs takes epochs (integers), e.g. --lr-decay-epochs 150,180,210; got "
                         f"{' '.join(values)!r}") from None
    if any(e < 1 for e in out):
        raise CamkdError(f"--lr-decay-epochs must be positive epochs, got {out}")
    return out


def _main_rank() -> bool:
    from camkd import dist

    return dist.current().main


def _loader_options(image_size: int | None, workers: int | None) -> dict:
    """--image-size and --workers as dataset loader options (only those given: a dataset refuses one it does not take)."""
    return {k: v for k, v in (("image_size", image_size), ("workers", workers)) if v is not None}


# The options every training job (train-teacher, distill) takes, declared once: `run_options` appends them to a
# command's signature (typer reads it) and hands them to the command as one dict, `run`.
_RUN_OPTIONS = {
    "seed": (SeedOpt, _R.seed), "device": (DeviceOpt, DeviceChoice.auto), "resume": (ResumeOpt, False),
    "auto_resume": (AutoResumeOpt, False), "deterministic": (DeterministicOpt, False),
    "precision": (PrecisionOpt, PrecisionChoice(_R.precision)), "channels_last": (ChannelsLastOpt, _R.channels_last),
    "compile": (CompileOpt, _R.compile), "sync_bn": (SyncBnOpt, False), "quiet": (QuietOpt, False),
}


def run_options(fn: Callable | None = None, **own_forms: tuple) -> Callable:
    """Give a command the shared run options (``_RUN_OPTIONS``) as its ``run`` parameter; ``own_forms`` replace an
    option's (annotation, default) for this command (``@run_options(seed=(TeacherSeedOpt, None))``)."""
    if fn is None:
        return functools.partial(run_options, **own_forms)
    forms = {**_RUN_OPTIONS, **own_forms}
    own = [p for name, p in inspect.signature(fn, eval_str=True).parameters.items() if name != "run"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
              for name, (annotation, default) in forms.items()]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        run = {name: kwargs.pop(name) for name in forms}
        return fn(**kwargs, run=run)

    wrapper.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + shared)
    return wrapper


def _run_config(out: Path | None, run: dict) -> RunConfig:
    """The run part of a job's config from --out and the shared run options."""
    return RunConfig(out=as_str(out), resume=run["resume"], auto_resume=run["auto_resume"], device=run["device"].value,
                     seed=run["seed"], deterministic=run["deterministic"], precision=run["precision"].value,
                     channels_last=run["channels_last"], compile=run["compile"], sync_bn=run["sync_bn"],
                     progress=not run["quiet"])


def _recipe_default(name: str) -> str:
    """train-teacher's default of one optimizer value as --help states it: in-memory data's, then image folders' if other."""
    from camkd.data.folder import FOLDER_DATASETS
    from camkd.train import recipe

    memory, files = (getattr(recipe(d), name) for d in ("cifar100", FOLDER_DATASETS[0]))
    text = [",".join(map(str, v)) if isinstance(v, list) else f"{v:g}" for v in (memory, files)]
    return f"[default: {text[0]}]" if text[0] == text[1] else f"[default: {text[0]}; {text[1]} for image folders]"


# train-teacher's optimizer options: left out, each comes from the dataset kind's recipe (camkd.train.recipe)
TeacherEpochsOpt = Annotated[Optional[int], typer.Option("--epochs", min=1, help=f"Training epochs {_recipe_default('epochs')}.")]
TeacherBatchOpt = Annotated[Optional[int], typer.Option("--batch-size", min=2, help="Global batch size (split over torchrun's "
                            f"ranks) {_recipe_default('batch_size')}.")]
TeacherLrOpt = Annotated[Optional[float], typer.Option("--lr", min=0.0, help="Learning rate [default: 0.05, 0.01 for "
                         "MobileNetV2/ShuffleV1/V2 and their tv: forms; 0.1 x batch / 256 for image folders, a fifth of "
                         "it for those].")]
TeacherDecayOpt = Annotated[Optional[list[str]], typer.Option("--lr-decay-epochs", metavar="EPOCH", help="Epochs after "
                            "which the lr decays (repeat the option, or give a comma-separated list) "
                            f"{_recipe_default('lr_decay_epochs')}.")]
TeacherDecayRateOpt = Annotated[Optional[float], typer.Option("--lr-decay-rate", min=0.0, metavar="RATE", help="Factor of "
                                "each lr decay " f"{_recipe_default('lr_decay_rate')}.")]
MomentumOpt = Annotated[Optional[float], typer.Option("--momentum", min=0.0, help=f"SGD momentum {_recipe_default('momentum')}.")]
WeightDecayOpt = Annotated[Optional[float], typer.Option("--weight-decay", min=0.0, help="SGD weight decay "
                           f"{_recipe_default('weight_decay')}.")]
# distill's recipe options are train-teacher's: left out, each comes from the data's recipe (camkd.train.recipe)
EpochsOpt, BatchOpt, LrOpt, DecayOpt = TeacherEpochsOpt, TeacherBatchOpt, TeacherLrOpt, TeacherDecayOpt


TeacherSeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed of the model's init and the sample order "
                           "[default: --trial's number; on --resume the one the checkpoint recorded].")]


@app.command("train-teacher", cls=PlainHelp)
@friendly
@run_options(seed=(TeacherSeedOpt, None))
def train_teacher_cmd(
    arch: Annotated[str, typer.Option("--arch", "-m", help="Model name, e.g. resnet32x4 (see `camkd models`), or published "
                                      "weights to fine-tune from: tv:NAME@WEIGHTS, timm:NAME.TAG (a new classifier for the "
                                      "data's classes; an ImageNet subset keeps their rows).")],
    dataset: Annotated[DatasetChoice, typer.Option("--dataset", "-d", help="Training data.")],
    data_dir: DataDirOpt = None,
    download: DownloadOpt = False,
    trial: Annotated[int, typer.Option("--trial", help="Trial number: part of the default --out, and the run's seed "
                     "(init, sample order, augmentation) unless --seed / --aug-seed are given.")] = 0,
    epochs: TeacherEpochsOpt = None,
    batch_size: TeacherBatchOpt = None,
    micro_batches: MicroOpt = _TO.micro_batches,
    lr: TeacherLrOpt = None,
    lr_decay_epochs: TeacherDecayOpt = None,
    lr_decay_rate: TeacherDecayRateOpt = None,
    momentum: MomentumOpt = None,
    weight_decay: WeightDecayOpt = None,
    nesterov: Annotated[bool, typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum.")] = _TO.nesterov,
    limit: LimitOpt = None,
    aug_seed: Annotated[Optional[int], typer.Option("--aug-seed", help="Seed of the augmentation views [default: the run's "
                        "seed (--seed, else --trial); on --resume the one the checkpoint recorded].")] = None,
    label_noise: Annotated[float, typer.Option("--label-noise", metavar="RATE", help="Replace this fraction of the "
                           "training labels (in [0, 1)) by a uniformly chosen other class; the test split stays clean.")] = 0.0,
    label_noise_seed: Annotated[int, typer.Option("--label-noise-seed", help="Seed of which labels change and to what.")] = 0,
    image_size: ImageSizeOpt = None,
    workers: WorkersOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder [default: runs/teachers/ARCH_DATASET_trial_T].")] = None,
    *,
    run: dict,
) -> None:
    """Train a teacher on seeded augmentation views: the reference's recipe on 28-32 px data, torchvision's on image folders."""
    from camkd.train import TrainConfig, train_teacher

    cfg = TrainConfig(
        arch=arch, trial=trial, aug_seed=aug_seed,
        data=DataConfig(dataset=dataset.value, data_dir=as_str(data_dir), download=download, limit=limit,
                        label_noise=label_noise, label_noise_seed=label_noise_seed,
                        options=_loader_options(image_size, workers)),
        optim=OptimConfig(epochs=epochs, batch_size=batch_size, lr=lr, lr_decay_epochs=_epochs(lr_decay_epochs or []) or None,
                          lr_decay_rate=lr_decay_rate, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                          drop_last=_TO.drop_last, micro_batches=micro_batches),
        run=_run_config(out, run),
    )
    s = train_teacher(cfg)
    if _main_rank():
        typer.echo(f"{s['arch']}: best top-1 {s['best_top1']:.2f}% (epoch {s['best_epoch']}), last {s['last_top1']:.2f}%, "
               f"{s['seconds']:.0f}s -> {s['out']}")


@app.command("cache-teachers", cls=PlainHelp)
@friendly
def cache_teachers_cmd(
    teacher: TeacherOpt,
    dataset: Annotated[DatasetChoice, typer.Option("--dataset", "-d", help="The data the teachers run over.")],
    views: Annotated[int, typer.Option("--views", "-V", min=1, help="Augmentation views to cache (epoch e uses view "
                                       "(e - 1) mod V).")],
    data_dir: DataDirOpt = None,
    download: DownloadOpt = False,
    limit: LimitOpt = None,
    aug_seed: Annotated[int, typer.Option("--aug-seed", help="Seed of the augmentation views.")] = 0,
    seed: OldSeedOpt = None,
    image_size: ImageSizeOpt = None,
    workers: WorkersOpt = None,
    features: Annotated[Optional[list[str]], typer.Option("--features", "-f", metavar="LAYER", help="Teacher features to store: "
                        "penultimate (what camkd needs), hint:L, or none (repeat) [default: penultimate].")] = None,
    dtype: Annotated[DtypeChoice, typer.Option("--dtype", help="Stored float type.")] = DtypeChoice.float16,
    feature_dtype: Annotated[Optional[FeatureDtypeChoice], typer.Option("--feature-dtype", help="Features' type: int8 "
                             "stores them with a float32 scale per sample and channel (max-abs / 127), about 4x smaller "
                             "than float32, read back as float32 [default: --dtype].")] = None,
    compressor: Annotated[CompressorChoice, typer.Option("--compressor", help="zstd (level 3) on the view x sample "
                          "arrays; the printed plan is then an upper bound.")] = CompressorChoice.none,
    logits: Annotated[str, typer.Option("--logits", metavar="dense|topk:K", help="dense: every class; topk:K: the K "
                      "largest logits per teacher plus exact float32 cross-entropy, entropy and logsumexp at each --kd-T "
                      "(the KL keeps a tail bin; see README).")] = "dense",
    kd_t: Annotated[Optional[list[float]], typer.Option("--kd-T", metavar="T", help="With --logits topk:K: a temperature "
                    "to distill at (repeat for several) [default: 4].")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Teacher batch [default: 64 on CPU, "
                                                      "256 on CUDA].")] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the teachers' test accuracy (not recorded).")] = False,
    device: DeviceOpt = DeviceChoice.auto,
    precision: Annotated[PrecisionChoice, typer.Option("--precision", help="Autocast of the teachers' forward (recorded: a "
                         "store continues only in its own); the stored type is --dtype.")] = PrecisionChoice.fp32,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Teachers and input batches in channels-last "
                             "(NHWC) memory format.")] = False,
    out: Annotated[Optional[str], typer.Option("--out", "-o", metavar="PATH|URL", help="Store: a path, or s3://, gs://, "
                                               "file:// [default: cache/DATASET_ARCHS_sSEED.zarr].")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a store made differently.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the planned store size and the free space; write "
                                          "nothing.")] = False,
    no_space_check: Annotated[bool, typer.Option("--no-space-check", help="Start even if the planned size exceeds the "
                                                 "free space.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run trained teachers once over seeded views and write their outputs to a Zarr store (resumable)."""
    from camkd.cache import CacheConfig, cache_teachers, format_cache_summary

    _renamed("--seed", "--aug-seed", seed)
    kw = {"features": features} if features else {}
    cfg = CacheConfig(teachers=teacher, dataset=dataset.value, data_dir=as_str(data_dir), download=download, limit=limit,
                      views=views, aug_seed=aug_seed, dtype=dtype.value, batch_size=batch_size, device=device.value,
                      out=as_str(out), overwrite=overwrite, progress=not quiet, evaluate=not no_eval, dry_run=dry_run,
                      feature_dtype=feature_dtype.value if feature_dtype else None, compressor=compressor.value,
                      space_check=not no_space_check, logits=logits, options=_loader_options(image_size, workers),
                      precision=precision.value, channels_last=channels_last, **kw)
    if kd_t:
        if not logits.strip().lower().startswith("top"):
            raise CamkdError("--kd-T is recorded only by a top-k store (--logits topk:K); a dense store serves every temperature")
        cfg.kd_T = list(kd_t)
    summary = cache_teachers(cfg)
    if _main_rank():
        typer.echo("\n".join(summary["plan"]) if dry_run else format_cache_summary(summary))


@app.command("cache-info", cls=PlainHelp)
@friendly
def cache_info_cmd(store: Annotated[str, typer.Argument(metavar="STORE", help="A camkd store: path or URL.")]) -> None:
    """Show a store's provenance, arrays, sizes and completeness."""
    from camkd.store.info import cache_info

    typer.echo(cache_info(store))


@app.command("cache-verify", cls=PlainHelp)
@friendly
def cache_verify_cmd(
    store: Annotated[str, typer.Argument(metavar="STORE", help="A camkd store: path or URL.")],
    teacher: Annotated[Optional[list[str]], typer.Option("--teacher", "-t", metavar="CKPT", help="The store's teachers (checkpoints or "
                       "published weights, as cache-teachers -t), in order: also recompute a sample with them.")] = None,
    sample: Annotated[int, typer.Option("--sample", min=1, help="Random (view, index) pairs to recompute.")] = VERIFY_SAMPLE,
    sample_seed: Annotated[int, typer.Option("--sample-seed", help="Seed of the random sample.")] = 0,
    seed: OldSeedOpt = None,
    repair: Annotated[bool, typer.Option("--repair", help="Mark corrupt blocks unwritten, so rerunning cache-teachers "
                                         "recomputes exactly those.")] = False,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
) -> None:
    """Check completeness and every chunk's checksum; with -t also recompute a sample (exit 1 if not OK)."""
    from camkd.cache import cache_verify

    _renamed("--seed", "--sample-seed", seed)
    report = cache_verify(store, teacher or [], sample=sample, seed=sample_seed, data_dir=as_str(data_dir),
                          device=device.value, repair=repair)
    typer.echo("\n".join(report.lines))
    if not report.ok:
        raise typer.Exit(code=1)


@app.command("distill", cls=PlainHelp)
@friendly
@run_options
def distill_cmd(
    arch: Annotated[str, typer.Option("--arch", "-m", help="Student model, e.g. vgg8 (see `camkd models`).")],
    cache: Annotated[Optional[str], typer.Option("--cache", "-c", metavar="PATH|URL", help="Teacher store made by "
                                                 "cache-teachers (a path, or s3://, gs://, file://).")] = None,
    method: Annotated[MethodChoice, typer.Option("--method", help="Distillation method.")] = _DISTILL_METHOD,
    gamma: Annotated[Optional[float], typer.Option("-r", "--gamma", help="Weight of the cross-entropy term "
                                                   f"[default: {_L.gamma:g}].")] = None,
    alpha: Annotated[Optional[float], typer.Option("-a", "--alpha", help="Weight of the logit distillation term "
                                                   f"[default: {_L.alpha:g}].")] = None,
    beta: Annotated[Optional[float], typer.Option("-b", "--beta", help="Weight of the feature term [default: camkd 50, "
                                                  "fitnet 100].")] = None,
    kd_t: Annotated[Optional[float], typer.Option("--kd-T", help=f"Distillation temperature [default: {_L.kd_T:g}].")] = None,
    aekd_c: Annotated[Optional[float], typer.Option("--aekd-C", help=f"AEKD's C (nu = 1/(C*K)) [default: {_L.aekd_C:g}].")] = None,
    hint_layer: Annotated[Optional[int], typer.Option("--hint-layer", help="FitNet hint layer index "
                                                      f"[default: {_L.hint_layer}].")] = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    lr_decay_epochs: DecayOpt = None,
    nesterov: Annotated[bool, typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum.")] = _O.nesterov,
    batch_size: BatchOpt = None,
    micro_batches: MicroOpt = _O.micro_batches,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder [default: "
                                                "runs/students/ARCH_METHOD_MODE_sSEED].")] = None,
    online: Annotated[bool, typer.Option("--online", help="Re-run the teachers every step instead of reading the "
                                         "store.")] = False,
    teacher: Annotated[Optional[list[str]], typer.Option("--teacher", "-t", metavar="CKPT", help="With --online: teacher checkpoints "
                                                         "or published weights, as cache-teachers -t (repeat).")] = None,
    dataset: Annotated[Optional[DatasetChoice], typer.Option("--dataset", "-d", help="With --online and no --cache: the "
                                                             "data.")] = None,
    aug_seed: Annotated[int, typer.Option("--aug-seed", help="With --online and no --cache: seed of the views (a store "
                                          "fixes its own).")] = DistillConfig.aug_seed,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", metavar="N", help="With --online and no --cache, "
                          "image folders: N x N views [default: 224 for imagefolder, 64 for tinyimagenet; a store fixes "
                          "its own].")] = None,
    workers: WorkersOpt = None,
    feature_memory_mb: Annotated[float, typer.Option("--feature-memory-mb", min=0.0, help="Hold a view's features in "
                                 "memory up to this size; stream beyond.")] = DistillConfig.feature_memory_mb,
    *,
    run: dict,
) -> None:
    """Train a student from a teacher store (no teacher runs), or with --online from live teachers."""
    from dataclasses import replace

    from camkd.distill import distill, distill_optim
    from camkd.methods import check_given_options

    given = {k: v for k, v in {"gamma": gamma, "alpha": alpha, "beta": beta, "kd_T": kd_t, "aekd_C": aekd_c,
                               "hint_layer": hint_layer}.items() if v is not None}
    check_given_options(method.value, list(given))
    cfg = DistillConfig(
        arch=arch, method=method.value, cache=cache or None, online=online, teachers=teacher or [], aug_seed=aug_seed,
        feature_memory_mb=feature_memory_mb,
        loss=LossConfig(**given),
        optim=replace(distill_optim(), epochs=epochs, batch_size=batch_size, lr=lr,  # None: the data's recipe
                      lr_decay_epochs=_epochs(lr_decay_epochs or []) or None, nesterov=nesterov, micro_batches=micro_batches),
        run=_run_config(out, run),
        data=DataConfig(dataset=dataset.value if dataset else None, data_dir=as_str(data_dir), limit=limit,
                        options=_loader_options(image_size, workers)),
    )
    s = distill(cfg)
    if _main_rank():
        typer.echo(f"{s['arch']} ({s['method']}, {s['mode']}): best top-1 {s['best_top1']:.2f}% (epoch {s['best_epoch']}), "
               f"last {s['last_top1']:.2f}%, {s['seconds']:.0f}s -> {s['out']}")


SplitChoice = choices("Split", ["test", "train"])


@app.command("report", cls=PlainHelp)
@friendly
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN", help="Run folders of train-teacher or distill (or a "
                                               "folder whose subfolders are runs).")],
    group: Annotated[bool, typer.Option("--group", help="Also average runs (mean ± std) whose saved configs are equal "
                                        "except the seeds (--seed, --aug-seed), --trial, the teacher paths (same sha256) "
                                        "and where they ran (--out, --device, --data-dir, --resume, -q); runs that "
                                        "ended at different epochs are not grouped.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", metavar="PREFIX", help="Also write PREFIX.json (every run's "
                                                "per-epoch records), PREFIX.md (the tables) and PREFIX.png (accuracy and "
                                                "loss per epoch, teacher weights); a .json, .md or .png given is taken "
                                                "off: --out rep.json writes rep.json, rep.md, rep.png.")] = None,
) -> None:
    """Compare runs: final/best test top-1, top-5, train loss, images/s and teacher weights, one row per run."""
    from camkd.report import plot, report, to_markdown

    prefix = out_prefix(out)
    r = report(runs, group=group)
    show(r, to_markdown, plot, prefix)


InterpolationChoice = choices("Interpolation", ["bilinear", "bicubic"])


@app.command("evaluate", cls=PlainHelp)
@friendly
def evaluate_cmd(
    checkpoint: Annotated[str, typer.Argument(metavar="CKPT", help="A checkpoint of train-teacher or distill (best.pth, "
                                              "last.pth), ARCH=PATH for a reference {'model': state_dict} file "
                                              "(RepDistiller's / CA-MKD's teachers; needs --dataset), or published weights "
                                              "tv:NAME@WEIGHTS / timm:NAME.TAG (needs --dataset, an image folder: "
                                              "evaluated with the weights' own resize, centre crop and normalization).")],
    dataset: Annotated[Optional[DatasetChoice], typer.Option("--dataset", "-d", help="Only for an ARCH=PATH reference "
                       "checkpoint (the data it was trained on, its standard normalization) or published weights (an image "
                       "folder: imagefolder, tinyimagenet) [default: the run's].")] = None,
    split: Annotated[SplitChoice, typer.Option("--split", help="test: the run's test split; train: the run's training "
                                               "samples (checked by fingerprint).")] = SplitChoice.test,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Folder with the dataset files [default: the "
                                                     "run's].")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Evaluation batch.")] = EVAL_BATCH_SIZE,
    device: DeviceOpt = DeviceChoice.auto,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N samples of the split.")] = None,
    precision: Annotated[Optional[PrecisionChoice], typer.Option("--precision", help="Autocast of the forward [default: "
                         "the run's --precision (and --channels-last), so a run's last.pth gives its last metrics; fp32 "
                         "for ARCH=PATH and published weights].")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", metavar="N", min=1, help="Image folders: the centre "
                          "crop, N x N [default: the published weights' crop, or the run's image size]; without --resize "
                          "the resize keeps the crop / resize ratio.")] = None,
    resize: Annotated[Optional[int], typer.Option("--resize", metavar="N", min=1, help="Image folders: resize the shorter "
                      "side to N before the centre crop [default: the published weights' resize, or round(crop / 0.875)]."
                      )] = None,
    interpolation: Annotated[Optional[InterpolationChoice], typer.Option("--interpolation", help="Image folders: the "
                             "resize's filter (Pillow's, antialiased) [default: the published weights', or bilinear]."
                             )] = None,
    workers: WorkersOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Top-1 / top-5 / loss of a checkpoint on a split (a camkd checkpoint's meta names arch, data, image size,
    normalization and precision: last.pth on the test split gives the run's last test_top1 / test_loss), or of
    published weights on an image folder, evaluated as published (ImageNet-1k weights on an ImageNet subset keep the
    dataset's classes)."""
    import json

    from camkd.evaluate import evaluate_checkpoint, format_evaluation

    r = evaluate_checkpoint(checkpoint, split=split.value, data_dir=as_str(data_dir), batch_size=batch_size,
                            device=device.value, limit=limit, dataset=dataset.value if dataset else None,
                            precision=precision.value if precision else None, image_size=image_size, resize=resize,
                            interpolation=interpolation.value if interpolation else None, workers=workers)
    typer.echo(json.dumps(r) if as_json else format_evaluation(r))


@app.command("models", cls=PlainHelp)
def models_cmd() -> None:
    """List the model zoo."""
    from camkd.models import MODELS, list_models

    typer.echo("\n".join([*list_models(), *MODELS.families(),
                           "tv:NAME@WEIGHTS, timm:NAME.TAG (published weights by name: teachers, --arch to fine-tune, "
                           "evaluate; docs/imagenet.md)"]))


@app.command("demo", cls=PlainHelp)
@friendly
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's runs.")] = Path("runs/demo"),
    data_dir: DataDirOpt = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Teacher and student epochs.")] = 3,
    limit: LimitOpt = 10000,
    device: DeviceOpt = DeviceChoice.auto,
    quiet: QuietOpt = False,
) -> None:
    """The main job on fashion-mnist: train small teachers, cache them, distill students (camkd, avg), print accuracies."""
    from camkd.demo import run_demo

    typer.echo(run_demo(out=out, data_dir=data_dir, epochs=epochs, limit=limit, device=device.value, progress=not quiet))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
