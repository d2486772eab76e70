"""The benchmarks' settings, each default stated once: the CLI, the runners and the tests read them here.

`bench storage` distills from the `bench accuracy --protocol equal` teachers with the same student
recipe, so its defaults are derived from :class:`AccuracyConfig` (and its temperature from the
distillation loss's), not written again. This module imports nothing heavy, so the CLI can read the
defaults when it starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from camkd.config import LossConfig
from camkd.methods import list_methods

PROTOCOLS = ("equal", "unequal")

# `bench storage`'s store options: what cache-teachers is given for each.
STORE_OPTIONS: dict[str, dict] = {
    "dense32": dict(dtype="float32"),
    "dense16": dict(dtype="float16"),
    "topk5": dict(dtype="float16", logits="topk:5"),
    "topk2": dict(dtype="float16", logits="topk:2"),
    "int8": dict(dtype="float16", feature_dtype="int8"),
    "int8zstd": dict(dtype="float16", feature_dtype="int8", compressor="zstd"),
}


@dataclass
class SpeedConfig:
    """`bench speed`: random-weight teachers on synthetic CIFAR-100-shaped data."""

    student: str = "vgg8"
    teacher: str = "resnet32x4"
    num_teachers: int = 3
    num_classes: int = 100
    samples: int = 384
    batch_size: int = 64
    repeats: int = 2
    device: str = "auto"
    threads: list[int] = field(default_factory=lambda: [1, 2])
    online: bool = True
    ranks: list[int] = field(default_factory=lambda: [1, 2])  # torchrun world sizes for the multi-rank rows ([] skips)
    methods: list[str] | None = None  # the methods to time beside ce (None: every one; camkd gives both its rows)
    precision: str = "fp32"  # fp32 | bf16 | fp16: every run it makes (distill, cache-teachers, plain loop, inference)
    channels_last: bool = False  # NHWC models and batches in every run it makes


@dataclass
class ReferenceProtocolConfig:
    """`bench protocol`: the reference protocol's time (CA-MKD on CIFAR-100: 3 x resnet32x4 -> vgg8, 240 epochs of
    batch 64), projected from short measurements on CIFAR-100-shaped synthetic data and random-weight teachers."""

    student: str = "vgg8"
    teacher: str = "resnet32x4"
    num_teachers: int = 3
    num_classes: int = 100
    samples: int = 50000  # CIFAR-100's training images
    test_samples: int = 10000  # CIFAR-100's test images: one evaluation per epoch, both ways
    batch_size: int = 64
    epochs: int = 240  # the protocol's epochs
    views: int = 240  # the protocol's cached views (one per epoch)
    method: str = "camkd"
    cache_views: int = 1  # views cached to measure caching samples/s (every sample of each)
    steps: int | None = 200  # timed steps of epoch 2, extrapolated to the epoch (None: the whole epoch)
    warmup_steps: int = 20  # steps of epoch 1 before the timed ones (checkpointed; the timed run resumes at epoch 2)
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False


@dataclass
class AccuracyConfig:
    """`bench accuracy`: three teachers of one protocol, one store, every method over seeds."""

    protocol: str = "equal"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    data_options: dict = field(default_factory=dict)  # dataset loader options (synthetic's num_samples)
    teacher_archs: list[str] = field(default_factory=lambda: ["resnet14", "wrn_16_1", "resnet20"])
    teacher_epochs: int = 5
    teacher_lr: float | None = None  # None: the train-teacher recipe's (0.05 for these archs)
    teacher_batch_size: int = 64
    teacher_seed: int = 0
    weak_limit: int = 1000  # unequal: the weak teacher's training images (the first N)
    noise_rate: float = 0.4  # unequal: the noisy teacher's label noise
    noise_seed: int = 0
    student: str = "resnet8"
    epochs: int = 5  # student epochs
    views: int | None = None  # cached views (epoch e uses view (e - 1) mod V); None: one per epoch
    limit: int | None = 10000  # student training images (the first N; None: all)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    batch_size: int = 64
    lr: float = 0.05
    methods: list[str] = field(default_factory=list_methods)
    online: bool = True  # also camkd --online with the first seed
    features: list[str] = field(default_factory=lambda: ["penultimate", "hint:2"])
    dtype: str = "float32"
    aug_seed: int = 0
    device: str = "auto"
    root: str = "bench/accuracy-run"
    progress: bool = False


_EQUAL = AccuracyConfig()


@dataclass
class StorageConfig:
    """`bench storage`: the equal protocol's teachers and student recipe, one store per option."""

    root: str = _EQUAL.root  # shared with bench accuracy: the same teachers are reused
    data_dir: str | None = None
    teacher_archs: list[str] = field(default_factory=lambda: list(_EQUAL.teacher_archs))
    teacher_epochs: int = _EQUAL.teacher_epochs
    student: str = _EQUAL.student
    epochs: int = _EQUAL.epochs  # student epochs = cached views
    limit: int = _EQUAL.limit
    seeds: int = 2  # student seeds 0 .. N-1 per option
    batch_size: int = _EQUAL.batch_size
    lr: float = _EQUAL.lr
    kd_T: float = LossConfig().kd_T
    options: list[str] = field(default_factory=lambda: list(STORE_OPTIONS))
    device: str = _EQUAL.device
    dataset: str = _EQUAL.dataset
    teacher_limit: int | None = None  # None: the full training split (tests use a small one)
    data_options: dict = field(default_factory=dict)  # dataset loader options (tests: synthetic's num_samples)


@dataclass
class DataBenchConfig:
    """`bench data`: camkd's image-folder loader against torchvision's ImageFolder + DataLoader on the same JPEGs."""

    images: int = 256  # generated JPEGs (ImageNet-sized; ignored with a root that already holds train/)
    classes: int = 4
    width: int = 500  # ImageNet's typical 500x375 (every other image is 375x500)
    height: int = 375
    quality: int = 90  # JPEG quality of the generated images
    image_size: int = 224  # the training views' side
    batch_size: int = 32
    workers: list[int] = field(default_factory=lambda: [0, 1, 2])
    repeats: int = 3  # interleaved timed rounds, after one warm-up round
    root: str | None = None  # where the images are (each missing split written there); None: a temporary folder
    device: str = "auto"
    # the store parts (cache-teachers vs plain inference, distill vs ce) on the same folder and loader, at the largest
    # worker count; their views are smaller than the loader table's, as models at 224 px take minutes per pass on a CPU
    store_image_size: int = 64
    teacher_archs: list[str] = field(default_factory=lambda: ["resnet8", "resnet14"])  # random-init: speed ignores weights
    student: str = "resnet8"

