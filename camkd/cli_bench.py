"""`camkd bench ...`: the benchmark commands, a sub-app the main CLI (:mod:`camkd.cli`) adds as ``bench``.

Each command parses its options into its config (every default stated once, in :mod:`camkd.bench.config`) and
calls one benchmark function; the benchmarks themselves load only when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from camkd.bench.config import PROTOCOLS, AccuracyConfig, DataBenchConfig, ReferenceProtocolConfig, SpeedConfig, StorageConfig
from camkd.cli_shared import (
    DataDirOpt,
    DatasetChoice,
    DeviceOpt,
    DtypeChoice,
    MethodChoice,
    OneLineErrors,
    OutOpt,
    PlainHelp,
    PrecisionChoice,
    QuietOpt,
    as_str,
    choices,
    friendly,
    out_prefix,
    show,
)

bench_app = typer.Typer(help="Benchmarks: speed ratios measured side by side in one run.", no_args_is_help=True, cls=OneLineErrors,
                        rich_markup_mode=None)

_SPEED, _ACC, _STORAGE, _DATA = SpeedConfig(), AccuracyConfig(), StorageConfig(), DataBenchConfig()  # stated once in camkd/bench/config.py
_REF = ReferenceProtocolConfig()
ProtocolChoice = choices("Protocol", list(PROTOCOLS))
BenchPrecisionOpt = Annotated[PrecisionChoice, typer.Option("--precision", help="Autocast of every run the benchmark "
                              "makes (fp16 with a gradient scaler).")]
BenchChannelsLastOpt = Annotated[bool, typer.Option("--channels-last", help="NHWC models and batches in every run the "
                                 "benchmark makes.")]


@bench_app.command("speed", cls=PlainHelp)
@friendly
def bench_speed_cmd(
    student: Annotated[str, typer.Option("--student", help="Student model.")] = _SPEED.student,
    teacher: Annotated[str, typer.Option("--teacher-arch", help="Teacher model.")] = _SPEED.teacher,
    num_teachers: Annotated[int, typer.Option("--teachers", "-K", min=1, help="Number of teachers.")] = _SPEED.num_teachers,
    samples: Annotated[int, typer.Option("--samples", min=64, help="Training samples (CIFAR-100-shaped, "
                                         "synthetic).")] = _SPEED.samples,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Student batch.")] = _SPEED.batch_size,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Interleaved rounds per measurement.")] = _SPEED.repeats,
    threads: Annotated[list[int], typer.Option("--threads", min=1, metavar="N", help="CPU threads to measure at "
                                               "(repeat).")] = _SPEED.threads,
    no_online: Annotated[bool, typer.Option("--no-online", help="Skip the online (teachers re-run) variants.")] = False,
    ranks: Annotated[list[int], typer.Option("--ranks", min=1, metavar="W", help="torchrun world sizes for the multi-rank "
                                             "rows (repeat).")] = _SPEED.ranks,
    no_ranks: Annotated[bool, typer.Option("--no-ranks", help="Skip the multi-rank rows.")] = False,
    method: Annotated[Optional[list[str]], typer.Option("--method", "-m", metavar="NAME", help="Time only these methods "
                      "beside ce (repeat; camkd gives its beta=0 and +features rows) [default: every method].")] = None,
    device: DeviceOpt = _SPEED.device,
    precision: BenchPrecisionOpt = _SPEED.precision,
    channels_last: BenchChannelsLastOpt = _SPEED.channels_last,
    out: OutOpt = None,
) -> None:
    """Throughput of the student alone (beside a plain PyTorch loop), cached and online distillation, caching, the
    reader, torchrun ranks."""
    from camkd.bench.speed import plot, run_speed, to_markdown

    prefix = out_prefix(out)
    r = run_speed(SpeedConfig(student=student, teacher=teacher, num_teachers=num_teachers, samples=samples,
                              batch_size=batch_size, repeats=repeats, device=device.value, online=not no_online,
                              threads=list(threads), ranks=[] if no_ranks else list(ranks), methods=method,
                              precision=precision.value, channels_last=channels_last))
    show(r, to_markdown, plot, prefix)


@bench_app.command("protocol", cls=PlainHelp)
@friendly
def bench_protocol_cmd(
    samples: Annotated[int, typer.Option("--samples", min=1, help="Training samples (CIFAR-100-shaped, synthetic; "
                                         "CIFAR-100 has 50,000).")] = _REF.samples,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Steps of epoch 2 to time, extrapolated to the "
                                                 "epoch.")] = _REF.steps,
    whole_epoch: Annotated[bool, typer.Option("--whole-epoch", help="Time the whole of epoch 2 instead of "
                                              "--steps.")] = False,
    cache_views: Annotated[int, typer.Option("--cache-views", min=1, help="Whole views to time caching over.")] = _REF.cache_views,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="The protocol's epochs.")] = _REF.epochs,
    views: Annotated[int, typer.Option("--views", min=1, help="The protocol's cached views.")] = _REF.views,
    test_samples: Annotated[int, typer.Option("--test-samples", min=1, help="Images of the evaluation every epoch "
                                              "makes.")] = _REF.test_samples,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Student batch.")] = _REF.batch_size,
    student: Annotated[str, typer.Option("--student", help="Student model.")] = _REF.student,
    teacher: Annotated[str, typer.Option("--teacher-arch", help="Teacher model.")] = _REF.teacher,
    num_teachers: Annotated[int, typer.Option("--teachers", "-K", min=1, help="Number of teachers.")] = _REF.num_teachers,
    device: DeviceOpt = _REF.device,
    precision: BenchPrecisionOpt = _REF.precision,
    channels_last: BenchChannelsLastOpt = _REF.channels_last,
    out: OutOpt = None,
) -> None:
    """The reference protocol's time (CA-MKD: 3 x resnet32x4 -> vgg8 on CIFAR-100, 240 epochs), projected from short
    measurements: 240 views cached + 240 epochs from the store, beside 240 epochs of --online."""
    from camkd.bench.protocol import plot, run_protocol, to_markdown

    prefix = out_prefix(out)
    r = run_protocol(ReferenceProtocolConfig(samples=samples, steps=None if whole_epoch else steps, cache_views=cache_views,
                                             epochs=epochs, views=views, test_samples=test_samples, batch_size=batch_size,
                                             student=student, teacher=teacher, num_teachers=num_teachers,
                                             device=device.value, precision=precision.value, channels_last=channels_last))
    show(r, to_markdown, plot, prefix)


@bench_app.command("accuracy", cls=PlainHelp)
@friendly
def bench_accuracy_cmd(
    protocol: Annotated[ProtocolChoice, typer.Option("--protocol", "-p", help="equal: three teachers of different archs "
                        "on the full training split; unequal: the same archs, one strong (equal's first teacher, reused), "
                        "one weak (--weak-limit images), one noisy (--noise labels corrupted).")] = _ACC.protocol,
    dataset: Annotated[DatasetChoice, typer.Option("--dataset", "-d", help="Data.")] = _ACC.dataset,
    data_dir: DataDirOpt = None,
    teacher_arch: Annotated[list[str], typer.Option("--teacher-arch", metavar="ARCH", help="The three teachers' "
                            "archs, in order (repeat 3 times).")] = _ACC.teacher_archs,
    teacher_epochs: Annotated[int, typer.Option("--teacher-epochs", min=1, help="Teacher epochs (lr x0.1 at 62.5/75/87.5 "
                              "% of them: 5 -> after 3 and 4).")] = _ACC.teacher_epochs,
    weak_limit: Annotated[int, typer.Option("--weak-limit", min=2, help="unequal: the weak teacher's training images "
                          "(the first N).")] = _ACC.weak_limit,
    noise: Annotated[float, typer.Option("--noise", metavar="RATE", help="unequal: the noisy teacher's fraction of "
                     "corrupted labels.")] = _ACC.noise_rate,
    noise_seed: Annotated[int, typer.Option("--noise-seed", help="unequal: seed of the corrupted labels.")] = _ACC.noise_seed,
    student: Annotated[str, typer.Option("--student", help="Student model.")] = _ACC.student,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Student epochs (lr x0.1 scaled as for the "
                      "teachers).")] = _ACC.epochs,
    views: Annotated[Optional[int], typer.Option("--views", "-V", min=1, help="Cached views, cycled over the epochs "
                     "[default: one per epoch].")] = None,
    dtype: Annotated[DtypeChoice, typer.Option("--dtype", help="Stored float type.")] = _ACC.dtype,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Student training images, the first N (0: all).")] = _ACC.limit,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Student seeds per method (0 .. N-1).")] = len(_ACC.seeds),
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Student batch.")] = _ACC.batch_size,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Student learning rate.")] = _ACC.lr,
    methods: Annotated[Optional[list[MethodChoice]], typer.Option("--method", help="Methods to run (repeat) "
                                                                  "[default: all].")] = None,
    no_online: Annotated[bool, typer.Option("--no-online", help="Skip camkd --online (seed 0).")] = False,
    device: DeviceOpt = _ACC.device,
    root: Annotated[Path, typer.Option("--root", "--work", help="Folder of the content-addressed teachers, stores and "
                                       "students (reruns reuse and resume).")] = Path(_ACC.root),
    quiet: QuietOpt = False,
    out: OutOpt = None,
) -> None:
    """Every method over seeds from equal or unequal teachers: mean +- std, paired differences, teachers'
    accuracy and disagreement, CA-MKD's weights.

    The defaults (below) take about an hour per protocol on a 2-core CPU; each teacher is exactly
    train-teacher -m ARCH -d DATASET --epochs E --lr-decay-epochs (scaled) --seed 0. The store holds
    features penultimate and hint:2, so every method runs. On a GPU: --device cuda --limit 0
    --epochs 30 --teacher-epochs 30 --views 10 (see camkd/bench/accuracy.py for CIFAR-100).
    """
    from camkd.bench.accuracy import plot, run_accuracy, to_markdown
    from camkd.methods import list_methods

    prefix = out_prefix(out)
    cfg = AccuracyConfig(protocol=protocol.value, dataset=dataset.value, data_dir=as_str(data_dir),
                         teacher_archs=list(teacher_arch),
                         teacher_epochs=teacher_epochs, weak_limit=weak_limit, noise_rate=noise, noise_seed=noise_seed,
                         student=student, epochs=epochs, views=views, dtype=dtype.value, limit=limit or None, seeds=list(range(seeds)),
                         batch_size=batch_size, lr=lr,
                         methods=[m.value for m in methods] if methods else list_methods(), online=not no_online,
                         device=device.value, root=str(root), progress=not quiet)
    r = run_accuracy(cfg)
    show(r, to_markdown, plot, prefix)


@bench_app.command("storage", cls=PlainHelp)
@friendly
def bench_storage_cmd(
    root: Annotated[Path, typer.Option("--root", help="Where teachers, stores and students are kept and reused "
                                       "(shared with bench accuracy).")] = Path(_STORAGE.root),
    data_dir: DataDirOpt = None,
    option: Annotated[list[str], typer.Option("--option", metavar="NAME", help="Store options to compare "
                                              "(repeat).")] = _STORAGE.options,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Student epochs (= cached views).")] = _STORAGE.epochs,
    limit: Annotated[int, typer.Option("--limit", min=2, help="Student training images (the first N).")] = _STORAGE.limit,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Student seeds per option.")] = _STORAGE.seeds,
    kd_t: Annotated[float, typer.Option("--kd-T", min=0.01, help="Distillation temperature (cached by top-k "
                                        "stores).")] = _STORAGE.kd_T,
    device: DeviceOpt = _STORAGE.device,
    out: OutOpt = None,
) -> None:
    """Bytes and CA-MKD student accuracy per store option (dense float32/16, top-k, int8 features), from bench
    accuracy's equal-protocol teachers."""
    from camkd.bench.storage import plot, run_storage, to_markdown

    prefix = out_prefix(out)
    r = run_storage(StorageConfig(root=str(root), data_dir=as_str(data_dir), options=list(option), epochs=epochs,
                                  limit=limit, seeds=seeds, kd_T=kd_t, device=device.value))
    show(r, to_markdown, plot, prefix)


@bench_app.command("data", cls=PlainHelp)
@friendly
def bench_data_cmd(
    images: Annotated[int, typer.Option("--images", min=1, help="JPEGs to generate (500x375 and 375x500).")] = _DATA.images,
    classes: Annotated[int, typer.Option("--classes", min=1, help="Class folders they are spread over.")] = _DATA.classes,
    image_size: Annotated[int, typer.Option("--image-size", min=1, metavar="N", help="Side of the training views.")] = _DATA.image_size,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = _DATA.batch_size,
    workers: Annotated[list[int], typer.Option("--workers", min=0, metavar="N", help="Worker processes to measure at, "
                                               "0 = the main process (repeat).")] = _DATA.workers,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Interleaved timed rounds (after a warm-up "
                                         "round).")] = _DATA.repeats,
    root: Annotated[Optional[Path], typer.Option("--root", metavar="FOLDER", help="Write the images here and keep them; "
                    "a folder that already holds train/CLASS/* is measured as it is [default: a temporary folder].")] = None,
    store_image_size: Annotated[int, typer.Option("--store-image-size", min=1, metavar="N", help="Side of the views in "
                                "the store parts (cache-teachers, distill; 224 px takes minutes on a CPU).")] = _DATA.store_image_size,
    teacher_arch: Annotated[list[str], typer.Option("--teacher-arch", metavar="ARCH", help="Random-init teachers the "
                            "store parts cache (repeat).")] = _DATA.teacher_archs,
    student: Annotated[str, typer.Option("--student", metavar="ARCH", help="The store parts' student.")] = _DATA.student,
    device: DeviceOpt = _DATA.device,
    out: OutOpt = None,
) -> None:
    """Training views/s of camkd's image-folder loader against torchvision's ImageFolder + DataLoader (RandomResizedCrop,
    flip, ToTensor, Normalize) on the same JPEGs and worker counts, side by side; then, on the same JPEGs and camkd's
    loader at the largest worker count, cache-teachers against plain inference and distill (kd, avg) against ce."""
    from camkd.bench.data import plot, run_data, to_markdown

    prefix = out_prefix(out)
    r = run_data(DataBenchConfig(images=images, classes=classes, image_size=image_size, batch_size=batch_size,
                                 workers=list(workers), repeats=repeats, root=as_str(root), device=device.value,
                                 store_image_size=store_image_size, teacher_archs=list(teacher_arch), student=student))
    show(r, to_markdown, plot, prefix)




@bench_app.command("reader", cls=PlainHelp)
@friendly
def bench_reader_cmd(
    cache: Annotated[str, typer.Option("--cache", "-c", metavar="STORE", help="The store to read (a path or URL).")],
    view: Annotated[int, typer.Option("--view", min=0, help="The view to read.")] = 0,
    window_blocks: Annotated[int, typer.Option("--window-blocks", min=1, help="Blocks per shuffle window, as distill "
                                               "--window-blocks.")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Student batch the windows are cut into.")] = 64,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Interleaved rounds (fewer if they pass 30 s).")] = 5,
    threads: Annotated[int, typer.Option("--threads", min=1, metavar="N", help="CPU threads.")] = 1,
    images_per_s: Annotated[Optional[float], typer.Option("--images-per-s", min=0.0, metavar="N", help="A student "
                            "step's images/s: also print the feature rate it needs.")] = None,
    device: DeviceOpt = _SPEED.device,
    out: OutOpt = None,
) -> None:
    """Streamed features (as distill reads a view over its memory budget) beside plain zarr's whole-view reads of the
    same store on this disk: MB/s and their ratio, and the rate --images-per-s needs (a minute at most)."""
    from camkd.bench.reader import ReaderConfig, plot, run_reader, to_markdown

    prefix = out_prefix(out)
    r = run_reader(ReaderConfig(cache=cache, view=view, window_blocks=window_blocks, batch_size=batch_size, rounds=rounds,
                                threads=threads, images_per_s=images_per_s, device=device.value))
    show(r, to_markdown, plot, prefix)
