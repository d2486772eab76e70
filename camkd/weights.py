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
import math
import os
import re
import socket
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
        return describe_geometry(self.crop, self.resize, self.interpolation)


def describe_geometry(crop: int, resize: int, interpolation: str) -> str:
    """An evaluation geometry in words: 'resize 232 bilinear, centre crop 224'."""
    return f"resize {resize} {interpolation}, centre crop {crop}"


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


_IN1K_TAG = re.compile(r"(?:.*_)?in1k(?:_\d+)?")  # '..._in1k', 'in1k', '..._in1k_384' (a resolution suffix)
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")  # an LFS blob's name in the Hugging Face cache: the file's sha256


def _hf_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment now (its constants are read once, at import):
    ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[var])))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def _hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set now, or when huggingface_hub was imported."""
    from huggingface_hub import constants

    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")) or bool(constants.HF_HUB_OFFLINE)


def _timm_cfg(spec: str, name: str, tag: str):
    """timm's pretrained config of ``name.tag``; one line listing the model's tags when it has no such tag."""
    import timm
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(f"{name}.{tag}", allow_unregistered=False)
    except (RuntimeError, KeyError, ValueError):
        cfg = None
    if cfg is None or cfg.tag != tag:  # an unknown tag; cfg.tag guards a lookup that fell back to the default tag
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{name}.*")]
        shown = ", ".join(tags[:12]) + (f", ... ({len(tags)} in all)" if len(tags) > 12 else "")
        raise CamkdError(f"{spec}: timm has no pretrained tag {tag!r} for {name}; "
                         + (f"its tags are: {shown}" if tags else "timm publishes no weights for it"))
    return cfg


def _timm_eval(spec: str, cfg) -> EvalTransform:
    """The transform timm evaluates ``cfg``'s weights with (``resolve_data_config`` + ``transforms_imagenet_eval``)."""
    if cfg.interpolation not in ("bilinear", "bicubic"):
        raise CamkdError(f"{spec}: timm evaluates these weights with {cfg.interpolation!r} interpolation; camkd has bilinear "
                         "and bicubic only")
    crop = int(cfg.input_size[-1])
    crop_pct = cfg.crop_pct or 0.875  # timm's DEFAULT_CROP_PCT
    return EvalTransform(crop=crop, resize=math.floor(crop / crop_pct), interpolation=cfg.interpolation,
                         mean=tuple(float(v) for v in cfg.mean), std=tuple(float(v) for v in cfg.std))


def _hf_endpoint() -> str:
    """The Hugging Face Hub's address: ``HF_ENDPOINT`` now, else huggingface_hub's (read at its import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why ``endpoint`` cannot be reached (a TCP connection, ``timeout`` s at most), None when it can. huggingface_hub
    retries a failed connection five times with growing waits (about 25 s a file, warnings on stderr): a machine
    without network hears it from this check at once instead."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:  # no route, refused, name not resolved, timed out
        return f"{url.hostname}:{port} cannot be reached: {first_line(e)}"
    return None


def _repo_folder(path: Path) -> Path:
    """The Hugging Face cache folder of a cached file's repo (``models--ORG--NAME``): deleting the file alone is not
    enough, huggingface_hub links a blob it still finds again."""
    real = path.resolve()
    return real.parent.parent if real.parent.name == "blobs" else path.parent


def _hf_weights_file(spec: str, hub_id: str, filename: str | None) -> Path:
    """The weights file of Hugging Face repo ``hub_id`` ('timm/NAME.TAG[@REVISION]') as timm looks for it:
    ``filename`` when the config names one (its .safetensors alternative first), else model.safetensors, then
    pytorch_model.bin. The cache first, without the network (as torch.hub uses a cached file); a file cached nowhere is
    downloaded there when the Hub can be reached, else one line (offline: ``HF_HUB_OFFLINE``, or no connection)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from huggingface_hub.utils import logging as hf_logging

    repo_id, _, revision = hub_id.partition("@")
    if filename is None:
        names = ["model.safetensors", "pytorch_model.bin"]
    elif filename.endswith(".bin"):
        safe = "model.safetensors" if filename == "pytorch_model.bin" else filename[:-4] + ".safetensors"
        names = [safe, filename]
    else:
        names = [filename]
    cache, offline, endpoint = _hf_cache_dir(), _hf_offline(), _hf_endpoint()
    fetch = dict(revision=revision or None, cache_dir=cache, endpoint=endpoint)
    for name in names:  # the cache: no network
        try:
            return Path(hf_hub_download(repo_id, name, local_files_only=True, **fetch))
        except (LocalEntryNotFoundError, EntryNotFoundError):
            continue
    why = "offline: HF_HUB_OFFLINE is set" if offline else _unreachable(endpoint)
    if why is None:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its retry warnings; the error, if any, is ours
        try:
            for name in names:
                try:
                    with contextlib.redirect_stderr(io.StringIO()):  # no progress bar
                        return Path(hf_hub_download(repo_id, name, **fetch))
                except EntryNotFoundError:  # not in the repo: the next name
                    continue
                except (LocalEntryNotFoundError, OSError, ValueError) as e:  # HTTP errors (a missing or gated repo),
                    why = why or first_line(e)  # the connection lost, an unwritable cache, a bad repo id
        finally:
            hf_logging.set_verbosity(verbosity)
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    raise CamkdError(f"{spec}: {names[0]} of {repo_id} is not in the Hugging Face cache and could not be downloaded "
                     f"({why or 'the repo has none of ' + ', '.join(names)}): fetch it on a machine with network "
                     f"(hf download {repo_id} {names[0]}) and copy its cache folder {folder.name} into {cache}, or point "
                     f"HF_HOME at a cache that holds it")


def load_timm(spec: str, arch: str, tag: str) -> Published:
    """timm's pretrained tag ``tag`` of ``arch`` ('timm:NAME'), as timm itself loads it.

    - the config: ``timm.models.get_pretrained_cfg('NAME.TAG')``; an unknown tag is one line listing the model's tags;
    - the file: from the Hugging Face cache (``$HF_HOME/hub``, read when called), repo ``cfg.hf_hub_id``,
      ``cfg.hf_hub_filename`` or else ``model.safetensors`` then ``pytorch_model.bin`` (timm's order); downloaded
      there when missing and online; offline (``HF_HUB_OFFLINE=1``) a missing file is one line naming the repo, the
      file and the folder. A config with only a ``url`` (a few old timm tags, no Hugging Face repo) is refused.
    - checked: a cached LFS file is a link to ``blobs/<its sha256>``; a file whose sha256 is not its blob's name is
      refused (the analogue of torchvision's prefix check).
    - loaded by ``timm.create_model('NAME.TAG', pretrained=True, pretrained_cfg_overlay={'file': path})``: timm's
      checkpoint filters, strict; the file given wins over every download source, so nothing is fetched then.
    - ``name``: the Hugging Face repo ('timm/resnet18.a1_in1k'); ``published_accuracy``: None (timm's package
      carries no accuracy); ``categories``: timm's ``label_names`` when the config has them; ``imagenet1k``: the
      config has 1000 classes, no label offset, and the tag ends ``in1k`` (optionally ``_RES``, e.g.
      ``in22k_ft_in1k_384``) -- timm's naming of ImageNet-1k heads; anything else (in21k, in12k, ...) is False.
    - eval: ``input_size[-1]`` crop (not ``test_input_size``), resize ``floor(crop / crop_pct)`` as timm's
      ``transforms_imagenet_eval``; its 'squash' and 'border' crop modes (a few tags) are taken as its 'center' mode
      (shorter side resized, centre crop), which :class:`EvalTransform` describes; interpolations other than bilinear
      and bicubic are refused. A config without classes (``num_classes`` 0: features only) is refused.
    """
    from camkd.models.timm_models import TimmModel, resolve

    name = resolve(arch.removeprefix("timm:"))
    cfg = _timm_cfg(spec, name, tag)
    if not cfg.num_classes:
        raise CamkdError(f"{spec}: these timm weights have no classifier (num_classes 0, a feature extractor); choose a "
                         "tag with one")
    if not cfg.hf_hub_id:
        raise CamkdError(f"{spec}: timm publishes these weights at a URL only ({cfg.url}), not on the Hugging Face Hub; "
                         f"save them as a state_dict and pass timm:{name}=FILE")
    evaluation = _timm_eval(spec, cfg)
    path = _hf_weights_file(spec, cfg.hf_hub_id, cfg.hf_hub_filename)
    sha256 = sha256_file(path)
    blob = path.resolve().name
    if _SHA256_NAME.fullmatch(blob) and blob != sha256:
        raise CamkdError(f"{path.resolve()} is not the published {cfg.hf_hub_id}: its sha256 is {sha256[:12]}..., its Hugging "
                         f"Face cache blob's name (the published file's sha256) {blob[:12]}...; delete {_repo_folder(path)} "
                         "(huggingface_hub reuses a blob it finds) and fetch it again")
    import timm

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            net = timm.create_model(f"{name}.{tag}", pretrained=True, num_classes=cfg.num_classes,
                                    pretrained_cfg_overlay=dict(file=str(path)))
    except RuntimeError as e:  # a strict load of other keys or shapes
        raise CamkdError(f"{path} ({cfg.hf_hub_id}) does not fit timm:{name}: {_timm_mismatch(name, cfg, path, e)}") from None
    except Exception as e:  # safetensors' and torch.load's errors on a file that is not a checkpoint have no common type
        raise CamkdError(f"{path} is not a readable weights file ({type(e).__name__}: {first_line(e)}); delete "
                         f"{_repo_folder(path)} and fetch it again") from None
    model = TimmModel(net, arch=f"timm:{name}", num_classes=cfg.num_classes, in_channels=3)
    labels = tuple(cfg.label_names or ())
    imagenet1k = cfg.num_classes == 1000 and not cfg.label_offset and _IN1K_TAG.fullmatch(tag) is not None
    return Published(arch=model.arch, spec=spec, name=cfg.hf_hub_id, path=path, sha256=sha256, model=model.eval(),
                     num_classes=cfg.num_classes, eval=evaluation, published_accuracy=None,
                     categories=labels if len(labels) == cfg.num_classes else None, imagenet1k=imagenet1k)


def _timm_mismatch(name: str, cfg, path: Path, error: Exception) -> str:
    """What differs between timm's model and the file's state_dict (before timm's filters); else the error's line."""
    import timm
    from timm.models import load_state_dict

    try:
        own = timm.create_model(name, pretrained=False, num_classes=cfg.num_classes).state_dict()
        return state_dict_mismatch(own, load_state_dict(str(path)))
    except Exception:  # the description is best effort: the load's own first line
        return first_line(error)


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
