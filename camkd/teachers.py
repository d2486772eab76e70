"""Loading trained teachers: camkd checkpoints, or reference `{'model': state_dict}` files with an arch.

A teacher spec is ``PATH`` (a camkd checkpoint, which names its arch), ``ARCH=PATH``
(any checkpoint, e.g. one published for RepDistiller / CA-MKD) or ``tv:NAME@WEIGHTS`` (torchvision's published
ImageNet weights by their enum member, e.g. ``tv:resnet50@IMAGENET1K_V2`` or ``tv:resnet18@DEFAULT``: the file in
torch.hub's cache, ``$TORCH_HOME/hub/checkpoints``, downloaded there the first time). The store knows no models: this
module hands it the teachers as a :class:`~camkd.store.runner.TeacherRunner` and rebuilds the
stored heads as modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from camkd.checkpoint import load_checkpoint, sha256_file
from camkd.classmap import IMAGENET1K, not_wnids, restrict_classes, subset_rows
from camkd.data import DataSplit
from camkd.errors import CamkdError
from camkd.models import create_model
from camkd.precision import Precision
from camkd.runs import FIXED_OPTIONS, OPTION_BEFORE
from camkd.store import layout
from camkd.store.reader import TeacherStore
from camkd.store.runner import TeacherRunner
from camkd.weights import load_published, named_weights_spec, state_dict_mismatch


@dataclass
class Teacher:
    """A frozen teacher network and where it came from."""

    arch: str
    path: Path
    sha256: str
    num_classes: int
    in_channels: int
    model: nn.Module
    spec: str = ""  # the --teacher argument as given
    meta: dict = field(default_factory=dict)  # a camkd checkpoint's record of how it was trained (empty for a reference one)
    weights: str | None = None  # named published weights, e.g. 'ResNet50_Weights.IMAGENET1K_V2' (None: a file)
    published_accuracy: float | None = None  # the ImageNet-1K top-1 the library reports for those weights
    imagenet1k: bool = False  # 1000 outputs in ImageNet-1k's class order (published ImageNet-1k weights)
    class_rows: list[int] | None = None  # the rows of its 1000 ImageNet-1k outputs kept for the data (classmap.py)

    @property
    def short_sha(self) -> str:
        return self.sha256[:12]


def parse_teacher_spec(spec: str) -> tuple[str | None, Path]:
    """'ARCH=PATH' -> (arch, path); 'PATH' -> (None, path)."""
    if "=" in spec:
        arch, _, path = spec.partition("=")
        return arch.strip(), Path(path.strip())
    return None, Path(spec)


def _infer_shapes(arch: str, state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """num_classes and in_channels of a reference checkpoint, read off its head and first conv."""
    with torch.device("meta"):  # only its keys and shapes are read: no memory, no initialisation (a ResNet-50 in ms)
        probe = create_model(arch, num_classes=2, in_channels=3)
    head_keys = [k for k, v in probe.get_head().state_dict().items() if v.ndim == 2]
    first_conv = next(k for k, v in probe.state_dict().items() if v.ndim == 4)
    if not head_keys or head_keys[-1] not in state or first_conv not in state:
        raise CamkdError(f"checkpoint keys do not fit arch '{arch}' (no '{first_conv}' or classifier weight); is it the right --arch?")
    return int(state[head_keys[-1]].shape[0]), int(state[first_conv].shape[1])


def load_named_teacher(spec: str, *, device: torch.device | str = "cpu") -> Teacher:
    """Published weights by name (:func:`camkd.weights.load_published`), frozen, on ``device``."""
    p = load_published(spec)
    p.model.eval().requires_grad_(False).to(device)
    return Teacher(arch=p.arch, path=p.path, sha256=p.sha256, num_classes=p.num_classes, in_channels=3, model=p.model,
                   spec=spec, weights=p.name, published_accuracy=p.published_accuracy, imagenet1k=p.imagenet1k)


def load_teacher(spec: str, *, device: torch.device | str = "cpu") -> Teacher:
    """Build the model, load the weights strictly, freeze it, eval mode. ``spec``: PATH, ARCH=PATH, tv:NAME@WEIGHTS or
    timm:NAME.TAG."""
    if named_weights_spec(spec) is not None:
        return load_named_teacher(spec, device=device)
    arch, path = parse_teacher_spec(spec)
    named_arch = named_weights_spec(arch) if arch else None
    if named_arch is not None:  # ARCH=FILE with a weights name as the arch
        raise CamkdError(f"{spec}: ARCH=FILE takes a model's name, and {arch} names published weights; write "
                         f"{named_arch[0]}={path} (the file replaces the published weights)")
    if arch is None and spec.startswith(("tv:", "timm:")) and not path.exists():  # a model's name, not weights
        raise CamkdError(f"{spec} names a model, not its weights: give published weights (tv:NAME@WEIGHTS, e.g. "
                         "tv:resnet50@IMAGENET1K_V2; timm:NAME.TAG, e.g. timm:resnet50.a1_in1k) or a file as ARCH=PATH")
    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta") or {}
    if arch is None:
        arch = meta.get("arch")
        if arch is None:
            raise CamkdError(f"{path} is not a camkd checkpoint and names no arch; pass it as ARCH=PATH, e.g. resnet32x4={path}")
    state = ckpt["model"]
    if "num_classes" in meta and "in_channels" in meta and meta.get("arch") == arch:
        num_classes, in_channels = int(meta["num_classes"]), int(meta["in_channels"])
    else:
        num_classes, in_channels = _infer_shapes(arch, state)
    model = create_model(arch, num_classes=num_classes, in_channels=in_channels)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        named = f" (the checkpoint says it is {meta['arch']})" if meta.get("arch") and meta.get("arch") != arch else ""
        raise CamkdError(f"{path} does not fit arch '{arch}'{named}: {state_dict_mismatch(model.state_dict(), state)}; "
                         "give the right ARCH=PATH") from None
    model.eval().requires_grad_(False).to(device)
    return Teacher(arch=model.arch, path=path, sha256=sha256_file(path), num_classes=num_classes,
                   in_channels=in_channels, model=model, spec=spec, meta=meta)


def load_teachers(specs: list[str], device: torch.device | str = "cpu", *, distinct: bool = True) -> list[Teacher]:
    """Every teacher of ``specs``, refusing the same checkpoint twice (it would double-weight that teacher) and, with
    ``distinct`` (making a store, distilling online), copies of one teacher (:func:`check_distinct`)."""
    teachers: list[Teacher] = []
    for spec in specs:
        t = load_teacher(spec, device=device)
        for i, other in enumerate(teachers):
            if other.sha256 == t.sha256:
                raise CamkdError(f"teachers {i + 1} and {len(teachers) + 1} are the same checkpoint (sha256 {t.short_sha}): "
                                 f"{other.spec}, {t.spec}; give each teacher once")
            if distinct:
                check_distinct(other, t, i + 1, len(teachers) + 1)
        teachers.append(t)
    return teachers


_RETRAIN = "retrain one with another --trial (it seeds the run unless --seed is given) or another --seed and --aug-seed"


def check_distinct(a: Teacher, b: Teacher, i: int, j: int) -> None:
    """Refuse teachers ``i`` and ``j`` when they are one teacher twice: equal weights (every tensor, ``torch.equal``;
    the first tensor of two different networks already differs, so this is cheap), or camkd records of the same
    training (:func:`training_record`: a rerun gives equal weights, up to a device's nondeterminism)."""
    wa, wb = a.model.state_dict(), b.model.state_dict()
    if list(wa) == list(wb) and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y.to(x.device))
                                    for x, y in zip(wa.values(), wb.values(), strict=True)):
        raise CamkdError(f"teachers {i} and {j} have equal weights ({a.spec}, {b.spec}): they are one teacher twice; "
                         f"{_RETRAIN}")
    ra, rb = training_record(a.meta), training_record(b.meta)
    if ra is not None and ra == rb:
        seeds = f"--seed {ra['--seed']} --aug-seed {ra['--aug-seed']}"
        raise CamkdError(f"teachers {i} and {j} were trained alike ({a.spec}, {b.spec}: {ra['arch']} on the same data with "
                         f"{seeds} and the same recipe, to epoch {ra['epoch']}; a rerun gives equal weights); {_RETRAIN}")


def training_record(meta: dict) -> dict | None:
    """What decides a camkd checkpoint's weights, from its meta: arch, method, data (fingerprint, label noise),
    teachers, the epoch it was saved at and the options that shape the trajectory (:data:`camkd.runs.FIXED_OPTIONS`:
    seeds, recipe, precision, ...); None for a checkpoint with no such record (a reference one)."""
    options = meta.get("options")
    if not isinstance(options, dict) or "epoch" not in meta:
        return None
    record = {key: meta.get(key) for key in ("arch", "method", "dataset", "dataset_fingerprint", "label_noise", "teachers",
                                             "epoch")}
    for path, flag in FIXED_OPTIONS.items():
        value: object = options
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        record[flag] = OPTION_BEFORE.get(path) if value is None else value
    return record


@torch.inference_mode()
def run_teachers(teachers: list[Teacher], x: torch.Tensor, layers: dict[str, int],
                 precision: Precision | None = None) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """All teachers on the same batch: logits [B, K, C] and requested features per layer per teacher, float32.

    ``precision``: the forward's autocast and memory format (the teachers' weights already in it: :func:`prepare`);
    under bf16/fp16 the outputs are cast back to float32, so what follows (the store, the methods) is the same."""
    precision = precision or Precision(device_type=x.device.type)
    x = precision.prepare_input(x)
    logits, feats = [], {name: [] for name in layers}
    with precision.autocast():
        for t in teachers:
            if layers:
                fs, out = t.model(x, is_feat=True)
                for name, i in layers.items():
                    feats[name].append(fs[i])
            else:
                out = t.model(x)
            logits.append(out)
    out = torch.stack(logits, dim=1)
    if precision.dtype is not None:
        out, feats = out.float(), {name: [f.float() for f in per] for name, per in feats.items()}
    return out, feats


def prepare(teachers: list[Teacher], precision: Precision) -> list[Teacher]:
    """The teachers' weights in ``precision``'s memory format (in place); returns them."""
    for t in teachers:
        precision.to_memory_format(t.model)
    return teachers


def runner(teachers: list[Teacher], device: torch.device, precision: Precision | None = None) -> TeacherRunner:
    """The teachers as the store sees them: provenance, head weights, and a function that runs them on a batch
    (in ``precision``: fp32 and the default layout when None)."""
    provenance = [{"arch": t.arch, "checkpoint": t.path.name, "path": str(t.path), "sha256": t.sha256,
                   "num_classes": t.num_classes,
                   **({"weights": t.weights, "published_accuracy": t.published_accuracy} if t.weights else {}),
                   **({"class_rows": list(t.class_rows)} if t.class_rows is not None else {})}
                  for t in teachers]
    heads = [{key: value.detach().cpu().numpy() for key, value in t.model.get_head().state_dict().items()} for t in teachers]
    precision = precision or Precision(device_type=device.type)
    prepare(teachers, precision)
    return TeacherRunner(provenance=provenance, heads=heads, device=device,
                         run=lambda x, layers: run_teachers(teachers, x, layers, precision))


def keep_rows(t: Teacher, rows: list[int]) -> Teacher:
    """Keep the classifier rows ``rows`` of teacher ``t`` (its 1000 ImageNet-1k outputs -> the data's classes)."""
    restrict_classes(t.model, rows)
    t.num_classes, t.class_rows = len(rows), list(rows)
    return t


def fit_teachers(teachers: list[Teacher], data: DataSplit, *, say=None) -> None:
    """ImageNet-1k teachers on an ImageNet subset keep the rows of the data's classes (classmap.py; ``say`` is told
    once per teacher), then every teacher is checked against the data (:func:`check_teachers`)."""
    for i, t in enumerate(teachers):
        rows = None if t.class_rows is not None else subset_rows(t.num_classes, data.class_names)
        if rows is not None:
            keep_rows(t, rows)
            if say is not None:
                known = "" if t.imagenet1k else ", taken to be in ImageNet-1k's class order"
                say(f"teacher {i + 1} ({t.spec}): its 1000 ImageNet-1k outputs{known}, restricted to the {len(rows)} "
                    f"classes of {data.name}")
    check_teachers(teachers, data)


def check_teachers(teachers: list[Teacher], data: DataSplit) -> None:
    """Teachers that take the data's images and predict its classes."""
    for t in teachers:
        if t.num_classes != data.num_classes:
            odd = not_wnids(data.class_names) if t.num_classes == IMAGENET1K else []
            hint = (f" (a 1000-class ImageNet-1k teacher keeps a dataset's classes when every class folder is an ImageNet "
                    f"wnid; {odd[0]} is not)" if odd and len(odd) < data.num_classes else "")
            raise CamkdError(f"teacher {t.path} has {t.num_classes} classes but {data.name} has {data.num_classes}{hint}; "
                             "use teachers trained on this dataset")
        if t.in_channels != data.in_channels:
            raise CamkdError(f"teacher {t.path} takes {t.in_channels}-channel images but {data.name} has {data.in_channels}")


def feature_shapes(teachers: list[Teacher], data: DataSplit, layers: dict[str, int], device: torch.device) -> dict[str, list[tuple]]:
    """{layer: per-teacher (c, h, w)} of the requested feature maps, from one blank image; a clear error for an index
    a teacher does not have or that is not a feature map."""
    x = torch.zeros((1, data.in_channels, data.image_size, data.image_size), dtype=torch.float32, device=device)
    shapes: dict[str, list[tuple]] = {name: [] for name in layers}
    for t in teachers:
        with torch.inference_mode():
            feats, _ = t.model(x, is_feat=True)
        for name, idx in layers.items():
            if not -len(feats) <= idx < len(feats):
                raise CamkdError(f"--features {layout.layer_option(name)}: {t.arch} has only {len(feats)} feature outputs "
                                 f"(indices 0..{len(feats) - 1})")
            if feats[idx].ndim != 4:
                raise CamkdError(f"--features {layout.layer_option(name)}: {t.arch}'s feature {idx} is not a feature map; "
                                 "pick another index")
            shapes[name].append(tuple(feats[idx].shape[1:]))
    return shapes


def stored_heads(store: TeacherStore, device: torch.device | str = "cpu") -> list[nn.Module]:
    """Each teacher's classifier head rebuilt from a store's weights, frozen, eval mode."""
    out = []
    in_ch = store.description.dataset.in_channels
    for t, meta in enumerate(store.description.teachers):
        head = create_model(meta.arch, num_classes=meta.num_classes, in_channels=in_ch).get_head()
        head.load_state_dict(store.head_state(t, list(head.state_dict())))
        out.append(head.eval().requires_grad_(False).to(device))
    return out
