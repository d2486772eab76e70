"""The small parts every job's options are composed of; each default is stated here once.

A job config (``TrainConfig``, ``DistillConfig``) holds one of each part plus its own few
fields; the CLI takes its defaults from these dataclasses, and every checkpoint saves the
whole config, so a run folder says how it was made.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """Which training data: a dataset name, where its files are, and how much of it."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    limit: int | None = None  # the first N training samples
    options: dict = field(default_factory=dict)  # loader options, e.g. synthetic's num_samples
    label_noise: float = 0.0  # teacher training only: this fraction of the training labels moved to another class
    label_noise_seed: int = 0  # which samples and which new classes (camkd.data.noise)


@dataclass
class OptimConfig:
    """The reference's recipe: SGD, step learning-rate decay, 240 epochs of batch 64."""

    epochs: int = 240
    batch_size: int = 64  # the global batch
    lr: float | None = None  # None: 0.05, or 0.01 for MobileNetV2/ShuffleV1/ShuffleV2
    lr_decay_epochs: list[int] = field(default_factory=lambda: [150, 180, 210])
    lr_decay_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    drop_last: bool = True  # drop an epoch's trailing partial batch (a batch of one is always dropped)
    micro_batches: int = 1  # BatchNorm micro-batches per process: W ranks == 1 process with W micro-batches


@dataclass
class LossConfig:
    """The distillation methods' coefficients and knobs; each method reads what it needs."""

    gamma: float = 1.0  # weight of the cross-entropy term (-r)
    alpha: float = 1.0  # weight of the logit distillation term (-a)
    beta: float | None = None  # weight of the feature term (-b); None: the method's reference default (camkd 50, fitnet 100)
    kd_T: float = 4.0  # distillation temperature
    aekd_C: float = 0.6  # AEKD's C (nu = 1/(C*K))
    hint_layer: int = 2  # FitNet's hint layer index


@dataclass
class RunConfig:
    """Where and how a run executes: its folder, device, the init-and-order seed, output."""

    out: str | None = None
    resume: bool = False
    auto_resume: bool = False  # resume when the folder holds a run, else start (torchrun --max-restarts, preemption)
    device: str = "auto"
    seed: int | None = 0  # model init and sample order (the augmentation views have their own seed); train-teacher: None = its --trial
    deterministic: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the forward passes (fp16 with a gradient scaler)
    channels_last: bool = False  # NHWC memory format for the model and its input batches
    compile: bool = False  # torch.compile of the student and the method's trainable parts
    sync_bn: bool = False  # SyncBatchNorm across ranks (CUDA only: DDP refuses it on CPU)
    progress: bool = True
