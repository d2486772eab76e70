"""Top-1 / top-5 accuracy of a model on un-augmented images (teachers, students, checkpoints).

:func:`evaluate` is what the training loop calls each epoch; :func:`evaluate_checkpoint` is
``camkd evaluate``: a saved checkpoint on the split its run used.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from camkd import dist
from camkd.data import DataSplit, SplitOptions, dataset_kind
from camkd.data.base import RUNTIME_OPTIONS
from camkd.data.norm import normalize
from camkd.errors import CamkdError
from camkd.precision import Precision

BATCH_SIZE = 256  # evaluation batch: the loop's every epoch and `camkd evaluate --batch-size`'s default (so they agree)


@torch.inference_mode()
def evaluate(model: nn.Module, data: DataSplit, *, batch_size: int = BATCH_SIZE, precision: Precision | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean CE loss on un-augmented images.

    Counts accumulate on the device and are read once at the end (no per-batch host sync). Under
    torchrun each rank passes its own slice of the split and the counts are summed over ranks.
    ``precision``: the forward's autocast and memory format (fp32 and the default layout when None).
    """
    was_training = model.training
    model.eval()
    dev = data.labels.device
    precision = precision or Precision(device_type=dev.type)
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # top-1 hits, top-5 hits, CE sum, images
    for images, y in data.eval_batches(batch_size, dev):
        x = precision.prepare_input(normalize(images, data.norm))
        with precision.autocast():
            logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += (top[:, 0] == y).sum()
        sums[1] += (top == y[:, None]).any(dim=1).sum()
        sums[2] += nn.functional.cross_entropy(logits, y, reduction="sum").double()
    sums[3] = len(data)
    model.train(was_training)
    top1, top5, loss, n = dist.all_sum(sums).tolist()
    n = max(n, 1)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n}


def checkpoint_split(ckpt: dict, split: str, *, data_dir: str | None = None, limit: int | None = None,
                     path: str = "the checkpoint") -> tuple[DataSplit, str]:
    """The ``split`` a camkd checkpoint's run used, on the CPU, and a few words saying which samples these are.

    The checkpoint's meta names the dataset, classes, channels, image size and normalization, and how its data
    opens again (``reopen``: :class:`~camkd.data.SplitOptions`, the options the run's splits were opened with, a
    store's for a student trained from one); its saved options give the data folder (``data_dir`` overrides it) and
    the decoding processes. ``test`` is the test split the run evaluated on each epoch. ``train`` is the run's
    training samples (its ``--limit``, or for a student trained from a store the store's samples, read through the
    store), checked against the fingerprint the checkpoint recorded. ``limit``: the first N of those.
    """
    from camkd.data import Normalization

    meta = ckpt.get("meta") or {}
    missing = [k for k in ("arch", "dataset", "num_classes", "in_channels") if k not in meta]
    if missing:
        raise CamkdError(f"{path} has no camkd meta ({', '.join(missing)} missing): evaluate needs a checkpoint written by "
                         "train-teacher or distill (best.pth or last.pth)")
    if split not in ("train", "test"):
        raise CamkdError(f"unknown split '{split}'; choose train or test")
    opts = meta.get("options") or {}
    data = opts.get("data") or {}
    name = meta["dataset"]
    folder = data_dir if data_dir is not None else data.get("data_dir")
    reopen = SplitOptions.from_dict(meta["reopen"]) if meta.get("reopen") else _reopen_before(meta, opts)
    runtime = {k: v for k, v in (data.get("options") or {}).items() if k in RUNTIME_OPTIONS and v is not None}
    what = "the test split"
    if split == "test":
        ds = reopen.load("test", data_dir=folder, **runtime)
    elif opts.get("cache"):  # a student trained from a store: the store fixed its samples
        ds = _store_train(opts.get("cache"), folder, path)
        what = "the run's training samples (the store's)"
    else:
        ds = reopen.load("train", data_dir=folder, limit=data.get("limit"), **runtime)
        what = "the run's training samples"
    if split == "train" and meta.get("dataset_fingerprint") and ds.fingerprint != meta["dataset_fingerprint"]:
        raise CamkdError(f"the {name} training samples here differ from the ones {path} was trained on (fingerprint "
                         f"{meta['dataset_fingerprint'][:12]}); give the --data-dir it was trained with")
    if ds.num_classes != meta["num_classes"] or ds.in_channels != meta["in_channels"]:
        raise CamkdError(f"{path} is a {meta['num_classes']}-class, {meta['in_channels']}-channel model, but {name} here has "
                         f"{ds.num_classes} classes and {ds.in_channels} channels")
    if "normalization" in meta:
        norm = Normalization(tuple(meta["normalization"]["mean"]), tuple(meta["normalization"]["std"]))
        ds = replace(ds, norm=norm)
    if limit is not None:
        if limit < len(ds):
            what = f"the first {limit} of {what}"
        ds = ds.limit(limit)
    return ds, what


def _reopen_before(meta: dict, opts: dict) -> SplitOptions:
    """How a checkpoint from before ``reopen`` was recorded opens its data: a run trained from the dataset with its
    own loader options; one trained from a store with the store's form (what its reader then derived from the data's
    kind: a generated set's classes, size and channels, an image folder's size)."""
    name, data = meta["dataset"], opts.get("data") or {}
    if data.get("dataset") and not opts.get("cache"):
        options = {k: v for k, v in (data.get("options") or {}).items() if k not in RUNTIME_OPTIONS}
        return SplitOptions(name, options, dataset_kind(name))
    return SplitOptions.of_form(name, num_classes=meta["num_classes"], image_size=meta.get("image_size"),
                                in_channels=meta["in_channels"])


def _store_train(cache: str | None, data_dir: str | None, path: str) -> DataSplit:
    from camkd.store import open_store
    from camkd.store.reader import load_cached_data

    if not cache:
        raise CamkdError(f"{path} names neither a dataset nor a store it was trained from; --split train cannot know its samples")
    try:
        train, _, _ = load_cached_data(open_store(cache), data_dir=data_dir)
    except CamkdError as e:
        raise CamkdError(f"--split train of a student trained from a store reads its samples through that store ({cache}): "
                         f"{e}") from None
    return train


def evaluate_checkpoint(path: str | Path, *, split: str = "test", data_dir: str | None = None, batch_size: int = BATCH_SIZE,
                        device: str = "auto", limit: int | None = None, dataset: str | None = None,
                        precision: str | None = None) -> dict:
    """Top-1 / top-5 (percent) and mean CE loss of a checkpoint (teacher or student) on ``split``.

    ``path`` is a camkd checkpoint, or ``ARCH=PATH`` for a reference ``{'model': state_dict}`` file
    (RepDistiller's / CA-MKD's published teachers); a reference file names neither its arch nor its
    data, so it needs the arch and ``dataset`` (evaluated with that dataset's standard normalization,
    the whole split). ``precision``: the forward's (fp32, bf16, fp16); None: the run's recorded ``--precision``
    and ``--channels-last`` (fp32 for a reference file). With the defaults, ``test`` on a camkd run's ``last.pth``
    gives that run's last ``test_top1`` and ``test_loss`` in ``metrics.jsonl`` (the same images, image size,
    normalization, batch size and precision; a ``--compile`` run's were computed by compiled kernels, these are not).
    """
    from camkd.checkpoint import load_checkpoint
    from camkd.device import resolve_device
    from camkd.models import create_model, resolve_arch
    from camkd.teachers import parse_teacher_spec
    from camkd.weights import state_dict_mismatch

    if batch_size < 1:
        raise CamkdError(f"--batch-size must be at least 1, got {batch_size}")
    if split not in ("train", "test"):
        raise CamkdError(f"unknown split '{split}'; choose train or test")
    dev = resolve_device(device)
    arch, file = parse_teacher_spec(str(path))
    ckpt = load_checkpoint(file)
    meta = ckpt.get("meta") or {}
    if not all(k in meta for k in ("arch", "dataset", "num_classes", "in_channels")):
        return _evaluate_reference(ckpt, arch, file, split=split, dataset=dataset, data_dir=data_dir,
                                   batch_size=batch_size, device=dev, limit=limit,
                                   precision=Precision.of(precision or "fp32", dev))
    if arch is not None and resolve_arch(arch) != resolve_arch(meta["arch"]):
        raise CamkdError(f"{file} is a camkd checkpoint of arch '{meta['arch']}', not '{arch}'; give the path alone")
    if dataset is not None and dataset != meta["dataset"]:
        raise CamkdError(f"{file} was trained on {meta['dataset']}, not {dataset}; leave out --dataset (its meta names the data)")
    data, what = checkpoint_split(ckpt, split, data_dir=data_dir, limit=limit, path=str(file))
    run = (meta.get("options") or {}).get("run") or {}
    prec = Precision.of(precision or run.get("precision") or "fp32", dev,
                        channels_last=bool(run.get("channels_last")))
    model = create_model(resolve_arch(meta["arch"]), num_classes=int(meta["num_classes"]), in_channels=int(meta["in_channels"]))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError:
        raise CamkdError(f"{file} does not fit its own arch '{meta['arch']}': "
                         f"{state_dict_mismatch(model.state_dict(), ckpt['model'])}") from None
    model = prec.to_memory_format(model.to(dev))
    acc = evaluate(model, data.to(dev), batch_size=batch_size, precision=prec)
    return {"checkpoint": str(file), "arch": model.arch, "method": meta.get("method"), "epoch": meta.get("epoch"),
            "dataset": data.name, "split": split, "samples": len(data), "which": what, "device": str(dev),
            "precision": prec.name, **acc}


def _evaluate_reference(ckpt: dict, arch: str | None, file: Path, *, split: str, dataset: str | None,
                        data_dir: str | None, batch_size: int, device: torch.device, limit: int | None,
                        precision: Precision) -> dict:
    """A checkpoint without camkd meta: the arch from ARCH=PATH, the data from --dataset."""
    from camkd.data import check_dataset, dataset_names, load_split
    from camkd.teachers import load_teacher

    if arch is None:
        raise CamkdError(f"{file} has no camkd meta, so it names no arch; pass it as ARCH=PATH, e.g. resnet32x4={file}")
    if dataset is None:
        raise CamkdError(f"{file} has no camkd meta, so it names no data; add --dataset ({', '.join(dataset_names())})")
    check_dataset(dataset)
    teacher = load_teacher(f"{arch}={file}", device=device)  # classes and channels read off the weights, loaded strictly
    data = load_split(dataset, split, data_dir=data_dir)
    if data.num_classes != teacher.num_classes or data.in_channels != teacher.in_channels:
        raise CamkdError(f"{file} is a {teacher.num_classes}-class, {teacher.in_channels}-channel {arch}, but {dataset} has "
                         f"{data.num_classes} classes and {data.in_channels} channels; is it the right --dataset?")
    what = f"the whole {split} split"
    if limit is not None and limit < len(data):
        what = f"the first {limit} of the {split} split"
        data = data.limit(limit)
    acc = evaluate(teacher.model, data.to(device), batch_size=batch_size, precision=precision)
    epoch = ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None  # RepDistiller saves the epoch beside the weights
    return {"checkpoint": str(file), "arch": teacher.arch, "method": None, "epoch": epoch, "dataset": data.name,
            "split": split, "samples": len(data), "which": what + ", the dataset's standard normalization",
            "device": str(device), "precision": precision.name, **acc}


def format_evaluation(r: dict) -> str:
    """One line: what was evaluated on what, and its top-1 / top-5 / loss."""
    method = f"{r['method']}, " if r.get("method") else ""
    epoch = f"epoch {r['epoch']}" if r.get("epoch") is not None else "no epoch recorded"
    precision = f", {r['precision']}" if r.get("precision", "fp32") != "fp32" else ""  # the run's, unless --precision
    return (f"{r['checkpoint']} ({r['arch']}, {method}{epoch}) on {r['dataset']} {r['split']} ({r['samples']} images, "
            f"{r['which']}{precision}): top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}%, loss {r['loss']:.4f}")
