"""The `camkd` command line: each command parses options and calls one importable function."""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from camkd.errors import CamkdError

app = typer.Typer(
    name="camkd",
    help="Confidence-Aware Multi-Teacher Knowledge Distillation from cached teacher outputs.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# Options shared across commands (huggingface_hub style aliases).
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="cifar100, cifar10, fashion-mnist or synthetic.")]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Folder with the dataset in torchvision's layout.")]
DownloadOpt = Annotated[bool, typer.Option("--download", help="Download the dataset if missing (needs network).")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Use only the first N training samples.", min=1)]
DeviceOpt = Annotated[DeviceChoice, typer.Option("--device", help="auto picks cuda when available.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the augmentation views, sample order and init.")]
DeterministicOpt = Annotated[bool, typer.Option("--deterministic", help="Deterministic kernels (bit-exact reruns).")]
AmpOpt = Annotated[bool, typer.Option("--amp", help="bf16 autocast and channels-last on CUDA.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CamkdError(f"expected comma-separated integers like 150,180,210, got '{text}'") from None


def friendly(fn: Callable) -> Callable:
    """Turn CamkdError (and Ctrl-C) into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CamkdError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; finished work is kept: rerun the same command to continue (train-teacher/distill: add --resume once an epoch has finished)", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


@app.command("train-teacher")
@friendly
def train_teacher_cmd(
    arch: Annotated[str, typer.Option("--arch", "-m", help="Model name, e.g. resnet32x4 (see `camkd models`).")],
    dataset: DatasetOpt,
    data_dir: DataDirOpt = None,
    download: DownloadOpt = False,
    trial: Annotated[int, typer.Option("--trial", help="Trial number (part of the default --out).")] = 0,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 240,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2)] = 64,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Default 0.05 (0.01 for MobileNetV2/ShuffleV1/V2).")] = None,
    lr_decay_epochs: Annotated[str, typer.Option("--lr-decay-epochs", help="Epochs after which lr x 0.1.")] = "150,180,210",
    nesterov: Annotated[bool, typer.Option("--nesterov/--no-nesterov")] = False,
    limit: LimitOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    seed: SeedOpt = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/teachers/ARCH_DATASET_trial_T).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pth.")] = False,
    deterministic: DeterministicOpt = False,
    amp: AmpOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a teacher with the reference's recipe on seeded augmentation views."""
    from camkd.train import TrainConfig, train_teacher

    cfg = TrainConfig(
        arch=arch, dataset=dataset, data_dir=str(data_dir) if data_dir else None, download=download, trial=trial,
        epochs=epochs, batch_size=batch_size, lr=lr, lr_decay_epochs=_int_list(lr_decay_epochs), nesterov=nesterov,
        limit=limit, device=device.value, seed=seed, out=str(out) if out else None, resume=resume,
        deterministic=deterministic, amp=amp, progress=not quiet,
    )
    s = train_teacher(cfg)
    typer.echo(f"{s['arch']}: best top-1 {s['best_top1']:.2f}% (epoch {s['best_epoch']}), last {s['last_top1']:.2f}%, "
               f"{s['seconds']:.0f}s -> {s['out']}")


class DtypeChoice(str, Enum):
    float16 = "float16"
    float32 = "float32"


TeacherOpt = Annotated[list[str], typer.Option("--teacher", "-t", help="Teacher checkpoint: PATH (camkd) or ARCH=PATH (reference).")]


@app.command("cache-teachers")
@friendly
def cache_teachers_cmd(
    teacher: TeacherOpt,
    dataset: DatasetOpt,
    views: Annotated[int, typer.Option("--views", "-V", min=1, help="Augmentation views to cache (epoch e uses view (e - 1) mod V).")],
    data_dir: DataDirOpt = None,
    download: DownloadOpt = False,
    limit: LimitOpt = None,
    seed: SeedOpt = 0,
    features: Annotated[Optional[list[str]], typer.Option("--features", "-f", help="none, penultimate, hint:L (repeatable).")] = None,
    dtype: Annotated[DtypeChoice, typer.Option("--dtype")] = DtypeChoice.float16,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 256,
    device: DeviceOpt = DeviceChoice.auto,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Store path (default cache/DATASET_ARCHS_sSEED.zarr).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a store made differently.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run trained teachers once over seeded views and write their outputs to a Zarr store (resumable)."""
    from camkd.store.report import format_cache_summary
    from camkd.store.writer import CacheConfig, cache_teachers

    cfg = CacheConfig(teachers=teacher, dataset=dataset, data_dir=str(data_dir) if data_dir else None, download=download,
                      limit=limit, views=views, seed=seed, features=features or [], dtype=dtype.value,
                      batch_size=batch_size, device=device.value, out=str(out) if out else None, overwrite=overwrite,
                      progress=not quiet)
    typer.echo(format_cache_summary(cache_teachers(cfg)))


@app.command("cache-info")
@friendly
def cache_info_cmd(store: Annotated[Path, typer.Argument(help="Path of a camkd store.")]) -> None:
    """Show a store's provenance, arrays, sizes and completeness."""
    from camkd.store.info import cache_info

    typer.echo(cache_info(store))


@app.command("cache-verify")
@friendly
def cache_verify_cmd(
    store: Annotated[Path, typer.Argument(help="Path of a camkd store.")],
    teacher: TeacherOpt,
    sample: Annotated[int, typer.Option("--sample", min=1, help="Random (view, index) pairs to recompute.")] = 256,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample.")] = 0,
) -> None:
    """Recompute a random sample with the teachers, check completeness and that every chunk decodes (exit 1 if not)."""
    from camkd.store.verify import cache_verify

    report = cache_verify(store, teacher, sample=sample, seed=seed, data_dir=str(data_dir) if data_dir else None,
                          device=device.value)
    typer.echo("\n".join(report.lines))
    if not report.ok:
        raise typer.Exit(code=1)


@app.command("distill")
@friendly
def distill_cmd(
    arch: Annotated[str, typer.Option("--arch", "-m", help="Student model, e.g. vgg8.")],
    cache: Annotated[Optional[Path], typer.Option("--cache", "-c", help="Teacher store made by cache-teachers.")] = None,
    method: Annotated[str, typer.Option("--method", help="ce, kd, avg, ebkd, aekd, fitnet or camkd.")] = "camkd",
    gamma: Annotated[float, typer.Option("-r", "--gamma", help="Weight of the cross-entropy term.")] = 1.0,
    alpha: Annotated[float, typer.Option("-a", "--alpha", help="Weight of the logit distillation term.")] = 1.0,
    beta: Annotated[Optional[float], typer.Option("-b", "--beta", help="Weight of the feature term (default: camkd 50, fitnet 100).")] = None,
    kd_t: Annotated[float, typer.Option("--kd-T", help="Distillation temperature.")] = 4.0,
    aekd_c: Annotated[float, typer.Option("--aekd-C", help="AEKD's C (nu = 1/(C*K)).")] = 0.6,
    hint_layer: Annotated[int, typer.Option("--hint-layer", help="FitNet hint layer index.")] = 2,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 240,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Default 0.05 (0.01 for MobileNetV2/ShuffleV1/V2).")] = None,
    lr_decay_epochs: Annotated[str, typer.Option("--lr-decay-epochs")] = "150,180,210",
    nesterov: Annotated[bool, typer.Option("--nesterov/--no-nesterov")] = True,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2)] = 64,
    seed: SeedOpt = 0,
    device: DeviceOpt = DeviceChoice.auto,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/students/ARCH_METHOD_MODE_sSEED).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pth.")] = False,
    online: Annotated[bool, typer.Option("--online", help="Re-run the teachers every step instead of reading the store.")] = False,
    teacher: Annotated[Optional[list[str]], typer.Option("--teacher", "-t", help="With --online: teacher checkpoints.")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="With --online and no --cache: the dataset.")] = None,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    feature_memory_mb: Annotated[float, typer.Option("--feature-memory-mb", help="Hold a view's features in memory up to this size; stream beyond.")] = 4096.0,
    deterministic: DeterministicOpt = False,
    amp: AmpOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a student from a teacher store (no teacher runs), or with --online from live teachers."""
    from camkd.distill import DistillConfig, distill

    cfg = DistillConfig(
        arch=arch, method=method, cache=str(cache) if cache else None, gamma=gamma, alpha=alpha, beta=beta, kd_T=kd_t,
        aekd_C=aekd_c, hint_layer=hint_layer, epochs=epochs, batch_size=batch_size, lr=lr,
        lr_decay_epochs=_int_list(lr_decay_epochs), nesterov=nesterov, seed=seed, device=device.value,
        out=str(out) if out else None, resume=resume, online=online, teachers=teacher or [], dataset=dataset,
        data_dir=str(data_dir) if data_dir else None, limit=limit, feature_memory_mb=feature_memory_mb,
        deterministic=deterministic, amp=amp, progress=not quiet,
    )
    s = distill(cfg)
    typer.echo(f"{s['arch']} ({s['method']}, {s['mode']}): best top-1 {s['best_top1']:.2f}% (epoch {s['best_epoch']}), "
               f"last {s['last_top1']:.2f}%, {s['seconds']:.0f}s -> {s['out']}")


bench_app = typer.Typer(help="Benchmarks: speed ratios measured side by side in one run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("speed")
@friendly
def bench_speed_cmd(
    student: Annotated[str, typer.Option("--student")] = "vgg8",
    teacher: Annotated[str, typer.Option("--teacher-arch")] = "resnet32x4",
    num_teachers: Annotated[int, typer.Option("--teachers", "-K", min=1)] = 3,
    samples: Annotated[int, typer.Option("--samples", min=64)] = 384,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2)] = 64,
    repeats: Annotated[int, typer.Option("--repeats", min=1)] = 2,
    no_online: Annotated[bool, typer.Option("--no-online", help="Skip the online (teachers re-run) variants.")] = False,
    device: DeviceOpt = DeviceChoice.auto,
    out: Annotated[Optional[Path], typer.Option("--out", help="JSON file (default bench/results/speed-<device>.json).")] = None,
) -> None:
    """Throughput of the student alone, cached and online distillation, caching and the reader."""
    import json

    from camkd.bench.speed import SpeedConfig, plot, run_speed, to_markdown

    r = run_speed(SpeedConfig(student=student, teacher=teacher, num_teachers=num_teachers, samples=samples,
                              batch_size=batch_size, repeats=repeats, device=device.value, online=not no_online))
    path = out or Path("bench/results") / f"speed-{r['device'].split(':')[0]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=2))
    md = to_markdown(r)
    path.with_suffix(".md").write_text(md + "\n")
    plot(r, path.with_suffix(".png"))
    typer.echo(md)
    typer.echo(f"\n-> {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")


@bench_app.command("accuracy")
@friendly
def bench_accuracy_cmd(
    dataset: Annotated[str, typer.Option("--dataset", "-d")] = "fashion-mnist",
    data_dir: DataDirOpt = None,
    teacher_arch: Annotated[str, typer.Option("--teacher-arch")] = "resnet20",
    num_teachers: Annotated[int, typer.Option("--teachers", "-K", min=1)] = 3,
    student: Annotated[str, typer.Option("--student")] = "resnet8",
    teacher_epochs: Annotated[int, typer.Option("--teacher-epochs", min=1)] = 8,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Student epochs (= cached views).")] = 6,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Training samples (0: all).")] = 10000,
    seeds: Annotated[int, typer.Option("--seeds", min=1)] = 3,
    methods: Annotated[str, typer.Option("--methods")] = "ce,kd,avg,ebkd,aekd,fitnet,camkd",
    device: DeviceOpt = DeviceChoice.auto,
    work: Annotated[Path, typer.Option("--work", help="Folder for teachers, store and runs (reruns resume).")] = Path("bench/accuracy-run"),
    out: Annotated[Path, typer.Option("--out", help="JSON result (with .md and .png beside it).")] = Path("bench/results/accuracy.json"),
) -> None:
    """Top-1 of every method and the student alone over seeds; camkd from the store vs --online."""
    import json

    from camkd.bench.accuracy import AccuracyConfig, plot, run_accuracy, to_markdown

    cfg = AccuracyConfig(dataset=dataset, data_dir=str(data_dir) if data_dir else None, teacher_arch=teacher_arch,
                         num_teachers=num_teachers, student=student, teacher_epochs=teacher_epochs, epochs=epochs,
                         limit=limit or None, seeds=seeds, methods=[m for m in methods.split(",") if m], device=device.value,
                         out=str(work))
    r = run_accuracy(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    md = to_markdown(r)
    out.with_suffix(".md").write_text(md + "\n")
    plot(r, out.with_suffix(".png"))
    typer.echo(md)
    typer.echo(f"\n-> {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


@app.command("models")
def models_cmd() -> None:
    """List the model zoo."""
    from camkd.models import list_models

    typer.echo("\n".join(list_models()))


@app.command("demo")
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
