"""What every training job sets up before the loop, and the words it hands the loop in.

``train-teacher``, ``distill`` and the benchmarks each start a run (:func:`start_run`), check the batch
(:func:`check_batch_size`), build the model (:func:`build_model`) and settle the learning rate
(:func:`resolve_lr`), then give :func:`camkd.fit.fit` a :class:`TrainData` (and, in tests and benchmarks,
:class:`Hooks`). Kept apart from the loop so that :mod:`camkd.fit` reads as the loop alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from camkd import dist
from camkd.config import OptimConfig, RunConfig
from camkd.data import DataSplit
from camkd.data.augspec import AugSpec
from camkd.device import resolve_device, set_deterministic
from camkd.errors import CamkdError
from camkd.models import create_model
from camkd.precision import Precision
from camkd.runs import RunFolder

# the reference's small-lr archs, and their torchvision forms (the same nets, ImageNet's stems)
SMALL_LR_ARCHS = ("mobilenetv2", "shufflev1", "shufflev2", "tv:mobilenet_v2", "tv:mobilenet_v3_large",
                  "tv:shufflenet_v2_x0_5", "tv:shufflenet_v2_x1_0")


def small_lr(arch: str) -> bool:
    """Whether ``arch`` takes the reference's small learning rate (a fifth of the others')."""
    return arch.lower() in SMALL_LR_ARCHS


def default_lr(arch: str) -> float:
    """The reference's learning rate: 0.01 for MobileNetV2/ShuffleV1/ShuffleV2 (and their tv: forms), 0.05 otherwise."""
    return 0.01 if small_lr(arch) else 0.05


def resolve_lr(optim: OptimConfig, arch: str) -> OptimConfig:
    """``optim`` with the learning rate the run will use (a defaulted one made explicit), so a run records and a
    ``--resume`` compares the number it trains with."""
    return optim if optim.lr is not None else replace(optim, lr=default_lr(arch))


@dataclass
class TrainData:
    """What the loop trains on: the training split (its labels on the device), the test split, the views."""

    train: DataSplit
    test: DataSplit
    spec: AugSpec
    views: int


@dataclass
class Hooks:
    """For tests and benchmarks, never part of a user's config."""

    max_steps: int | None = None  # stop after this many steps in all
    on_step: Callable[[int, dict[str, Tensor]], None] | None = None  # (epoch, losses) after each step


def check_batch_size(batch_size: int, n: int, *, parts: int = 1) -> None:
    """An epoch must have at least one trainable batch, and each of the ``parts`` slices of a batch
    (ranks x micro-batches) at least 2 samples, all of one size."""
    if batch_size < 2:
        raise CamkdError(f"--batch-size must be at least 2 (BatchNorm needs 2 samples), got {batch_size}")
    if batch_size % parts or batch_size // parts < 2:
        raise CamkdError(f"--batch-size {batch_size} does not split into {parts} equal slices of at least 2 "
                         f"(ranks x --micro-batches); use a multiple of {2 * parts}")
    if batch_size > n:
        raise CamkdError(f"--batch-size {batch_size} is larger than the {n} training samples, so no step would run; "
                         "lower --batch-size" + (" or raise --limit" if n < 64 else ""))


def start_run(run: RunConfig, out: Path) -> tuple[torch.device, RunFolder, dist.World]:
    """What every training job does first, on every rank before any collective: the device, the run
    folder's checks (nothing is created yet), then joining torchrun's group and the kernel settings."""
    device = dist.device_for(resolve_device(run.device))
    if run.sync_bn and device.type != "cuda":
        raise CamkdError("--sync-bn needs CUDA (DDP refuses SyncBatchNorm on CPU); drop --sync-bn or use --device cuda")
    run_precision(run, device)  # an unsupported --precision or a --compile without its compiler: refused before any work
    folder = RunFolder(out, resume=run.resume, auto_resume=run.auto_resume)
    folder.check()
    world = dist.init(device)
    set_deterministic(run.deterministic)
    return device, folder, world


def run_precision(run: RunConfig, device: torch.device) -> Precision:
    """The run's --precision, --channels-last and --compile on ``device``, checked."""
    return Precision.of(run.precision, device, channels_last=run.channels_last, compile=run.compile)


def build_model(arch: str, train: DataSplit, run: RunConfig, init: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """The model to train, seeded by ``run.seed``, on the data's device (channels-last with --channels-last, SyncBN
    with --sync-bn); ``init`` sets its starting weights (published ones: :func:`init_from_published`)."""
    device = train.labels.device
    torch.manual_seed(run.seed)
    model = create_model(arch, num_classes=train.num_classes, in_channels=train.in_channels)
    if init is not None:
        init(model)
    model = model.to(device)
    model = run_precision(run, device).to_memory_format(model)
    if run.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def init_from_published(model: nn.Module, spec: str, train: DataSplit) -> dict:
    """Start ``model`` (built for ``train``'s classes, seeded) from the published weights ``spec`` (fine-tuning): every
    tensor but the classifier's is the published one; the classifier is new (its seeded initialization) for the data's
    classes, unless they are ImageNet wnids and the weights have ImageNet-1k's 1000 outputs, when it keeps their rows
    (classmap.py). Returns what the run records: the weights' name, file, sha256 and the rows kept (or None)."""
    from camkd.classmap import IMAGENET1K, are_wnids, classifier_keys, restrict_classes, subset_rows
    from camkd.weights import load_published, state_dict_mismatch

    if train.in_channels != 3:
        raise CamkdError(f"{spec} takes 3-channel images but {train.name} has {train.in_channels}; fine-tune on RGB data")
    p = load_published(spec)
    rows = subset_rows(p.num_classes, train.class_names)
    if rows is not None:
        restrict_classes(p.model, rows)
    # the published classifier stays where its classes are the data's: an ImageNet subset's rows, or ImageNet-1k itself
    # (1000 wnid folders, in the weights' order: sorted)
    whole = rows is None and p.num_classes == train.num_classes == IMAGENET1K and are_wnids(train.class_names)
    state = p.model.state_dict()
    if rows is None and not whole:  # a new classifier: drop the published one's tensors
        drop = classifier_keys(p.model)
        state = {k: v for k, v in state.items() if k not in drop}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - classifier_keys(model):
        raise CamkdError(f"{spec} does not fit {model.arch}: {state_dict_mismatch(model.state_dict(), state)}")
    return {"name": p.name, "spec": spec, "path": str(p.path), "sha256": p.sha256, "class_rows": rows,
            "classifier": "new" if rows is None and not whole else "published"}
