"""Published weights by name: ``tv:NAME@WEIGHTS`` (torchvision's weights enum) and ``timm:NAME.TAG`` (timm's
pretrained tags), found where those libraries keep them, checked, and loaded into camkd's model wrappers.

:func:`load_published` returns a :class:`Published`: the model (as published: its classes, 1000 for ImageNet-1k
weights), the file it came from and its sha256, the weights' name, the accuracy the library reports for them (where it
reports one), their class list when the library names it, and :class:`EvalTransform`, the evaluation transform the
weights were published with (resize, crop, interpolation, normalization). Teachers (``-t``), ``train-teacher --arch``
(fine-tuning) and ``evaluate`` all load named weights through it.

- torchvision: the file in torch.hub's cache (``$TORCH_HOME/hub/checkpoints``), downloaded there the first time;
  torch.hub never re-checks a file already in its cache, so camkd checks its sha256 against the prefix in the file's
  name and refuses a file that is not the published one.
- timm: see :func:`load_timm` (the Hugging Face cache).
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from camkd.checkpoint import sha256_file
from camkd.errors import CamkdError
from camkd.models import create_model

_TV = re.compile(r"(tv:[A-Za-z0-9_]+)@([A-Za-z0-9_.]+)")  # tv:NAME@WEIGHTS (no '=': ARCH=PATH is a file)
_TIMM = re.compile(r"(timm:[A-Za-z0-9_]+)\.([A-Za-z0-9_]+)")  # timm:NAME.TAG (a timm arch without a tag has no '.')
_HASH = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's convention: NAME-<sha256 prefix>.EXT


@dataclass(frozen=True)
class EvalTransform:
    """How published weights were evaluated: resize the shorter side to ``resize`` (``interpolation``, antialiased),
    centre-crop ``crop`` x ``crop``, normalize with ``mean`` / ``std``."""

    crop: int
    resize: int
    interpolation: str  # 'bilinear' or 'bicubic'
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def crop_fraction(self) -> float:
        return self.crop / self.resize

    def describe(self) -> str:
        return f"resize {self.resize} {self.interpolation}, centre crop {self.crop}"


@dataclass
class Published:
    """Named published weights, loaded: ``model`` in eval mode, not frozen (a teacher freezes it, fine-tuning trains it)."""

    arch: str  # camkd's arch: 'tv:resnet50', 'timm:resnet18'
    spec: str  # as given: 'tv:resnet50@IMAGENET1K_V2', 'timm:resnet18.a1_in1k'
    name: str  # the weights' full name: 'ResNet50_Weights.IMAGENET1K_V2', 'timm/resnet18.a1_in1k'
    path: Path  # the file loaded
    sha256: str
    model: nn.Module
    num_classes: int
    eval: EvalTransform
    published_accuracy: float | None = None  # ImageNet-1k top-1 the library reports (torchvision does; timm does not)
    categories: tuple[str, ...] | None = None  # the library's class names, when it gives them
    imagenet1k: bool = False  # 1000 outputs in ImageNet-1k's class order (class i = the i-th of its sorted wnids)


def named_weights_spec(spec: str) -> tuple[str, str] | None:
    """'tv:NAME@WEIGHTS' -> ('tv:NAME', 'WEIGHTS'); 'timm:NAME.TAG' -> ('timm:NAME', 'TAG'); None for anything else
    (a file: PATH, ARCH=PATH; an arch without weights)."""
    spec = spec.strip()
    m = _TV.fullmatch(spec) or _TIMM.fullmatch(spec)
    return (m.group(1), m.group(2)) if m else None


def resolve_tv_weights(name: str, member: str):
    """torchvision's weights enum member ``member`` (or ``DEFAULT``) of builder ``name``; one line when unknown."""
    from camkd.models.tv import NAMES

    if name not in NAMES:
        raise CamkdError(f"unknown torchvision model {name!r} in tv:{name}@{member}; choose one of: {', '.join(NAMES)}")
    import torchvision.models

    enum = torchvision.models.get_model_weights(name)
    key = member.removeprefix(f"{enum.__name__}.")  # 'ResNet50_Weights.IMAGENET1K_V2' is taken too
    try:
        return enum[key]
    except KeyError:
        valid = [w.name for w in enum] + ["DEFAULT"]
        raise CamkdError(f"tv:{name} has no weights {member!r}; torchvision's {enum.__name__} are: {', '.join(valid)}") from None


def published_sha256_prefix(file_name: str) -> str | None:
    """The sha256 prefix a torch.hub file name carries ('resnet50-11ad3fa6.pth' -> '11ad3fa6'; 8 hex digits or
    more), None when it carries none."""
    m = _HASH.search(file_name)
    return m.group(1) if m else None


def check_published(path: Path, sha256: str, weights_name: str, url: str) -> None:
    """Refuse a cached file whose sha256 does not start with the prefix in its (torchvision) file name: torch.hub
    never re-checks a file already in its cache, so this one is not the published weights."""
    prefix = published_sha256_prefix(path.name)
    if prefix is not None and not sha256.startswith(prefix):
        raise CamkdError(f"{path} is not the published {weights_name}: its sha256 starts {sha256[:len(prefix)]}, the "
                         f"published file's starts {prefix} (its name says so); delete it and fetch it again from {url}")


def first_line(e: BaseException) -> str:
    """An exception's message as one line (torch.load's run over several)."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _tv_eval(weights) -> EvalTransform:
    """torchvision's ``weights.transforms()`` (an ImageClassification preset) as an :class:`EvalTransform`."""
    t = weights.transforms()
    return EvalTransform(crop=int(t.crop_size[0]), resize=int(t.resize_size[0]), interpolation=t.interpolation.value,
                         mean=tuple(float(v) for v in t.mean), std=tuple(float(v) for v in t.std))


def load_tv(spec: str, arch: str, member: str) -> Published:
    """torchvision's published weights ``member`` of ``arch`` ('tv:NAME'), from torch.hub's cache (downloaded there when
    missing), sha256-checked against the prefix in the file name, loaded strictly into camkd's ``tv:`` wrapper."""
    weights = resolve_tv_weights(arch.removeprefix("tv:"), member)
    weights_name = f"{type(weights).__name__}.{weights.name}"
    url = weights.url
    file_name = Path(urlparse(url).path).name
    model_dir = Path(torch.hub.get_dir()) / "checkpoints"
    path = model_dir / file_name
    if path.is_file():  # checked before it is unpickled
        check_published(path, sha256_file(path), weights_name, url)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torch.hub's 'Downloading: ...' line (offline, the error says it)
            state = torch.hub.load_state_dict_from_url(url, model_dir=str(model_dir), map_location="cpu", progress=False,
                                                       check_hash=False, file_name=file_name, weights_only=True)
    except OSError as e:  # no network (URLError is an OSError), a refused download, an unwritable folder
        if path.is_file():
            raise CamkdError(f"{path}: cannot read the weights file ({first_line(e)}); delete it and fetch it again from {url}") from None
        raise CamkdError(f"{weights_name} is not in torch.hub's cache and could not be downloaded ({first_line(e)}): put {file_name} "
                         f"in {model_dir} (fetch it from {url} on a machine with network; TORCH_HOME moves the folder)") from None
    except Exception as e:  # torch.load's errors on a file that is not a checkpoint have no common type
        raise CamkdError(f"{path} is not a readable weights file ({type(e).__name__}: {first_line(e)}); delete it and fetch it again "
                         f"from {url}") from None
    sha256 = sha256_file(path)
    check_published(path, sha256, weights_name, url)  # a file downloaded just now
    categories = tuple(weights.meta.get("categories") or ())
    num_classes = len(categories) or 1000
    model = create_model(arch, num_classes=num_classes, in_channels=3)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CamkdError(f"{path} ({weights_name}) does not fit arch '{arch}': "
                         f"{state_dict_mismatch(model.state_dict(), state)}") from None
    metrics = weights.meta.get("_metrics") or {}
    acc = (metrics.get("ImageNet-1K") or {}).get("acc@1")
    return Published(arch=model.arch, spec=spec, name=weights_name, path=path, sha256=sha256, model=model.eval(),
                     num_classes=num_classes, eval=_tv_eval(weights), published_accuracy=None if acc is None else float(acc),
                     categories=categories or None, imagenet1k=num_classes == 1000 and "ImageNet-1K" in metrics)


def load_timm(spec: str, arch: str, tag: str) -> Published:
    """timm's pretrained tag ``tag`` of ``arch`` ('timm:NAME')."""
    raise CamkdError(f"{spec}: timm's pretrained tags are not supported yet; save the weights as a state_dict and pass "
                     f"{arch}=FILE")


def load_published(spec: str) -> Published:
    """The named published weights ``spec`` ('tv:NAME@WEIGHTS' or 'timm:NAME.TAG'), loaded."""
    named = named_weights_spec(spec)
    if named is None:
        raise CamkdError(f"{spec!r} names no published weights; write tv:NAME@WEIGHTS or timm:NAME.TAG")
    arch, member = named
    return load_tv(spec, arch, member) if arch.startswith("tv:") else load_timm(spec, arch, member)


def state_dict_mismatch(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """What differs between a model's state_dict and a checkpoint's: missing, unexpected and reshaped keys."""
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    reshaped = sorted(k for k in set(own) & set(given)
                      if hasattr(given[k], "shape") and tuple(given[k].shape) != tuple(own[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} keys with other shapes (e.g. {k}: checkpoint {list(given[k].shape)}, "
                     f"model {list(own[k].shape)})")
    return ", ".join(parts) or "the weights do not load"
