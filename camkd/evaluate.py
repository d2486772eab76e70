"""Top-1 / top-5 accuracy of a model on un-augmented images (teachers, students, checkpoints, published weights).

:func:`evaluate` is what the training loop calls each epoch; :func:`evaluate_checkpoint` is
``camkd evaluate``: a saved checkpoint on the split its run used, or published weights by name
(``tv:NAME@WEIGHTS``, ``timm:NAME.TAG``) on an image folder with their own eval transform (:func:`evaluate_published`).
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
from camkd.weights import describe_geometry

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
                     path: str = "the checkpoint", workers: int | None = None) -> tuple[DataSplit, str]:
    """The ``split`` a camkd checkpoint's run used, on the CPU, and a few words saying which samples these are.

    The checkpoint's meta names the dataset, classes, channels, image size and normalization, and how its data
    opens again (``reopen``: :class:`~camkd.data.SplitOptions`, the options the run's splits were opened with, a
    store's for a student trained from one); its saved options give the data folder (``data_dir`` overrides it) and
    the decoding processes. ``test`` is the test split the run evaluated on each epoch. ``train`` is the run's
    training samples (its ``--limit``, or for a student trained from a store the store's samples, read through the
    store), checked against the fingerprint the checkpoint recorded. ``limit``: the first N of those. ``workers``: an
    image folder's decoding processes instead of the run's.
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
    if workers is not None:
        runtime["workers"] = workers
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
                        precision: str | None = None, image_size: int | None = None, resize: int | None = None,
                        interpolation: str | None = None, workers: int | None = None) -> dict:
    """Top-1 / top-5 (percent) and mean CE loss of a checkpoint (teacher or student) on ``split``.

    ``path`` is a camkd checkpoint, or ``ARCH=PATH`` for a reference ``{'model': state_dict}`` file
    (RepDistiller's / CA-MKD's published teachers); a reference file names neither its arch nor its
    data, so it needs the arch and ``dataset`` (evaluated with that dataset's standard normalization,
    the whole split). ``precision``: the forward's (fp32, bf16, fp16); None: the run's recorded ``--precision``
    and ``--channels-last`` (fp32 for a reference file). With the defaults, ``test`` on a camkd run's ``last.pth``
    gives that run's last ``test_top1`` and ``test_loss`` in ``metrics.jsonl`` (the same images, image size,
    normalization, batch size and precision; a ``--compile`` run's were computed by compiled kernels, these are not).
    ``path`` may also name published weights (``tv:NAME@WEIGHTS``, ``timm:NAME.TAG``): :func:`evaluate_published`.
    Image folders only: ``image_size`` (the centre crop), ``resize`` (the shorter side before it) and ``interpolation``
    replace the evaluation geometry (by default the run's image size, resized to round(size / 0.875) bilinear);
    ``workers``: the decoding processes.
    """
    from camkd.checkpoint import load_checkpoint
    from camkd.device import resolve_device
    from camkd.models import create_model, resolve_arch
    from camkd.teachers import parse_teacher_spec
    from camkd.weights import named_weights_spec, state_dict_mismatch

    if batch_size < 1:
        raise CamkdError(f"--batch-size must be at least 1, got {batch_size}")
    if split not in ("train", "test"):
        raise CamkdError(f"unknown split '{split}'; choose train or test")
    geometry = {"image_size": image_size, "resize": resize, "interpolation": interpolation}
    if named_weights_spec(str(path)) is not None:
        return evaluate_published(str(path), split=split, dataset=dataset, data_dir=data_dir, batch_size=batch_size,
                                  device=device, limit=limit, precision=precision, workers=workers, **geometry)
    dev = resolve_device(device)
    arch, file = parse_teacher_spec(str(path))
    ckpt = load_checkpoint(file)
    meta = ckpt.get("meta") or {}
    if not all(k in meta for k in ("arch", "dataset", "num_classes", "in_channels")):
        return _evaluate_reference(ckpt, arch, file, split=split, dataset=dataset, data_dir=data_dir,
                                   batch_size=batch_size, device=dev, limit=limit,
                                   precision=Precision.of(precision or "fp32", dev), workers=workers, geometry=geometry)
    if arch is not None and resolve_arch(arch) != resolve_arch(meta["arch"]):
        raise CamkdError(f"{file} is a camkd checkpoint of arch '{meta['arch']}', not '{arch}'; give the path alone")
    if dataset is not None and dataset != meta["dataset"]:
        raise CamkdError(f"{file} was trained on {meta['dataset']}, not {dataset}; leave out --dataset (its meta names the data)")
    data, what = checkpoint_split(ckpt, split, data_dir=data_dir, limit=limit, path=str(file), workers=workers)
    data, what = _override_geometry(data, what, **geometry)
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
                        precision: Precision, workers: int | None = None, geometry: dict | None = None) -> dict:
    """A checkpoint without camkd meta: the arch from ARCH=PATH, the data from --dataset."""
    from camkd.classmap import subset_rows
    from camkd.data import check_dataset, dataset_names, load_split
    from camkd.teachers import keep_rows, load_teacher

    if arch is None:
        raise CamkdError(f"{file} has no camkd meta, so it names no arch; pass it as ARCH=PATH, e.g. resnet32x4={file}")
    if dataset is None:
        raise CamkdError(f"{file} has no camkd meta, so it names no data; add --dataset ({', '.join(dataset_names())})")
    check_dataset(dataset)
    teacher = load_teacher(f"{arch}={file}", device=device)  # classes and channels read off the weights, loaded strictly
    data = load_split(dataset, split, data_dir=data_dir, **({} if workers is None else {"workers": workers}))
    rows = subset_rows(teacher.num_classes, data.class_names)  # a 1000-class file on ImageNet wnids, as a teacher is run
    if rows is not None:
        keep_rows(teacher, rows)
    if data.num_classes != teacher.num_classes or data.in_channels != teacher.in_channels:
        raise CamkdError(f"{file} is a {teacher.num_classes}-class, {teacher.in_channels}-channel {arch}, but {dataset} has "
                         f"{data.num_classes} classes and {data.in_channels} channels; is it the right --dataset?")
    what = f"the whole {split} split"
    if limit is not None and limit < len(data):
        what = f"the first {limit} of the {split} split"
        data = data.limit(limit)
    if rows is not None:
        what += f", its 1000 outputs restricted to the dataset's {len(rows)} ImageNet-1k classes"
    data, what = _override_geometry(data, what, **(geometry or {}))
    acc = evaluate(teacher.model, data.to(device), batch_size=batch_size, precision=precision)
    epoch = ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None  # RepDistiller saves the epoch beside the weights
    return {"checkpoint": str(file), "arch": teacher.arch, "method": None, "epoch": epoch, "dataset": data.name,
            "split": split, "samples": len(data), "which": what + ", the dataset's standard normalization",
            "device": str(device), "precision": precision.name, **acc}


def _geometry(base: tuple[int, int, str], fraction: float, image_size: int | None, resize: int | None,
              interpolation: str | None) -> tuple[int, int, str]:
    """(crop, resize, interpolation): ``base``'s, each replaced where given; a crop given without a resize keeps the
    base's crop / resize ratio ``fraction`` (round(crop / fraction))."""
    crop = base[0] if image_size is None else image_size
    if resize is None:
        resize = base[1] if image_size is None else round(crop / fraction)
    return crop, resize, interpolation or base[2]


def _override_geometry(data: DataSplit, what: str, *, image_size: int | None = None, resize: int | None = None,
                       interpolation: str | None = None) -> tuple[DataSplit, str]:
    """An image folder evaluated at the given geometry (--image-size, --resize, --interpolation), said in ``what``;
    unchanged when none is given; one line for data held in memory (their images have one size)."""
    if image_size is None and resize is None and interpolation is None:
        return data, what
    with_eval = getattr(data, "with_eval", None)
    if with_eval is None:
        given = next(f for f, v in (("--image-size", image_size), ("--resize", resize), ("--interpolation", interpolation))
                     if v is not None)
        raise CamkdError(f"{given} applies to image folders (their images are resized and centre-cropped); {data.name} is "
                         "held in memory at its own size")
    geometry = _geometry(data.eval_geometry, 0.875, image_size, resize, interpolation)
    return with_eval(*geometry), f"{what}, {describe_geometry(*geometry)}"


def evaluate_published(spec: str, *, split: str = "test", dataset: str | None = None, data_dir: str | None = None,
                       batch_size: int = BATCH_SIZE, device: str = "auto", limit: int | None = None,
                       precision: str | None = None, image_size: int | None = None, resize: int | None = None,
                       interpolation: str | None = None, workers: int | None = None) -> dict:
    """Top-1 / top-5 (percent) and mean CE loss of published weights (``tv:NAME@WEIGHTS``, ``timm:NAME.TAG``) on
    ``split`` of an image-folder ``dataset``, evaluated as published: the weights' own eval transform (resize the shorter
    side, ``interpolation`` antialiased, centre crop) and normalization; ``image_size`` (the crop), ``resize`` and
    ``interpolation`` override the transform's (a crop alone keeps its crop / resize ratio).

    ImageNet-1k weights on an ImageNet subset (class folders that are ImageNet wnids, fewer than 1000) keep the
    classifier rows of the dataset's classes (classmap.py), as a teacher does. The accuracy the library publishes
    (ImageNet-1k val's) is given beside the measured one only on a 1000-class test split."""
    from camkd.classmap import restrict_classes, subset_rows
    from camkd.data import Normalization, check_dataset, dataset_names, load_split
    from camkd.device import resolve_device
    from camkd.weights import load_published

    folders = [n for n in dataset_names() if dataset_kind(n) == "files"]
    if dataset is None:
        raise CamkdError(f"{spec} names published weights, not data: add --dataset ({', '.join(folders)}) and --data-dir, "
                         "the image folder to evaluate them on")
    check_dataset(dataset)
    if dataset_kind(dataset) != "files":
        raise CamkdError(f"{spec} is evaluated on an image folder with the weights' own resize and centre crop; {dataset} is "
                         f"held in memory at its own size: use --dataset {' or '.join(folders)} with --data-dir")
    if batch_size < 1:
        raise CamkdError(f"--batch-size must be at least 1, got {batch_size}")
    if split not in ("train", "test"):
        raise CamkdError(f"unknown split '{split}'; choose train or test")
    dev = resolve_device(device)
    p = load_published(spec)
    e = p.eval
    crop, size, interp = _geometry((e.crop, e.resize, e.interpolation), e.crop_fraction, image_size, resize, interpolation)
    options = {"image_size": crop, **({} if workers is None else {"workers": workers})}
    data = load_split(dataset, split, data_dir=data_dir, **options)
    rows = subset_rows(p.num_classes, data.class_names)
    restricted = ""
    if rows is not None:
        restrict_classes(p.model, rows)
        order = "" if p.imagenet1k else ", taken to be in ImageNet-1k's class order"
        restricted = f", restricted to the dataset's {len(rows)} ImageNet-1k classes{order}"
    if p.model.num_classes != data.num_classes:
        raise CamkdError(f"{spec} predicts {p.model.num_classes} classes but {dataset} here has {data.num_classes} "
                         f"(class folders {', '.join((data.class_names or ())[:3])}...); only ImageNet-1k weights on "
                         "folders named by ImageNet wnids are restricted to the dataset's classes")
    what = f"the whole {split} split"
    if limit is not None and limit < len(data):
        what = f"the first {limit} of the {split} split"
        data = data.limit(limit)
    data = replace(data.with_eval(crop, size, interp), norm=Normalization(tuple(e.mean), tuple(e.std)))
    if (crop, size, interp) == (e.crop, e.resize, e.interpolation):
        how = f"the weights' eval transform ({describe_geometry(crop, size, interp)}) and normalization"
    else:
        how = f"{describe_geometry(crop, size, interp)} (the weights': {e.describe()}), the weights' normalization"
    prec = Precision.of(precision or "fp32", dev)
    model = prec.to_memory_format(p.model.to(dev))
    acc = evaluate(model, data.to(dev), batch_size=batch_size, precision=prec)
    published = p.published_accuracy if split == "test" and data.num_classes == 1000 else None
    return {"checkpoint": spec, "arch": p.arch, "weights": p.name, "weights_file": str(p.path), "sha256": p.sha256,
            "method": None, "epoch": None, "dataset": data.name, "split": split, "samples": len(data),
            "which": f"{what}, {how}{restricted}", "device": str(dev), "precision": prec.name,
            "published_top1": published, **acc}


def format_evaluation(r: dict) -> str:
    """One line: what was evaluated on what, and its top-1 / top-5 / loss (and published weights' published top-1)."""
    method = f"{r['method']}, " if r.get("method") else ""
    epoch = f"epoch {r['epoch']}" if r.get("epoch") is not None else "no epoch recorded"
    precision = f", {r['precision']}" if r.get("precision", "fp32") != "fp32" else ""  # the run's, unless --precision
    what = f"{r['weights']}" if r.get("weights") else f"{r['arch']}, {method}{epoch}"
    published = f", published top-1 {r['published_top1']:.2f}%" if r.get("published_top1") is not None else ""
    return (f"{r['checkpoint']} ({what}) on {r['dataset']} {r['split']} ({r['samples']} images, "
            f"{r['which']}{precision}): top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}%, loss {r['loss']:.4f}{published}")
