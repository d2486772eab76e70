"""Loading trained teachers: camkd checkpoints, or reference `{'model': state_dict}` files with an arch.

A teacher spec is ``PATH`` (a camkd checkpoint, which names its arch) or ``ARCH=PATH``
(any checkpoint, e.g. one published for RepDistiller / CA-MKD).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from camkd.checkpoint import load_checkpoint, sha256_file
from camkd.errors import CamkdError
from camkd.models import create_model

FEATURE_LAYERS_HELP = "none, penultimate or hint:L (L = index into the model's feature list)"


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
    probe = create_model(arch, num_classes=2, in_channels=3)
    head_keys = [k for k, v in probe.get_head().state_dict().items() if v.ndim == 2]
    first_conv = next(k for k, v in probe.state_dict().items() if v.ndim == 4)
    if not head_keys or head_keys[-1] not in state or first_conv not in state:
        raise CamkdError(f"checkpoint keys do not fit arch '{arch}' (no '{first_conv}' or classifier weight); is it the right --arch?")
    return int(state[head_keys[-1]].shape[0]), int(state[first_conv].shape[1])


def load_teacher(spec: str, *, device: torch.device | str = "cpu") -> Teacher:
    """Build the model, load the weights strictly, freeze it, eval mode."""
    arch, path = parse_teacher_spec(spec)
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
                   in_channels=in_channels, model=model, spec=spec)


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


def load_teachers(specs: list[str], device: torch.device | str = "cpu") -> list[Teacher]:
    """Every teacher of ``specs``, refusing the same checkpoint twice (it would double-weight that teacher)."""
    teachers: list[Teacher] = []
    for spec in specs:
        t = load_teacher(spec, device=device)
        for i, other in enumerate(teachers):
            if other.sha256 == t.sha256:
                raise CamkdError(f"teachers {i + 1} and {len(teachers) + 1} are the same checkpoint (sha256 {t.short_sha}): "
                                 f"{other.spec}, {t.spec}; give each teacher once")
        teachers.append(t)
    return teachers


def parse_layer(text: str) -> tuple[str, int] | None:
    """'penultimate' -> ('penultimate', -2); 'hint:L' -> ('hintL', L); 'none' -> None."""
    text = text.strip().lower()
    if text == "none":
        return None
    if text == "penultimate":
        return "penultimate", -2
    if text.startswith("hint"):
        num = text[4:].lstrip(":")
        num = num or "2"
        if num.lstrip("-").isdigit():
            return f"hint{int(num)}", int(num)
    raise CamkdError(f"unknown feature layer '{text}'; use {FEATURE_LAYERS_HELP}")


@torch.inference_mode()
def run_teachers(teachers: list[Teacher], x: torch.Tensor, layers: dict[str, int]) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """All teachers on the same batch: logits [B, K, C] and requested features per layer per teacher."""
    logits, feats = [], {name: [] for name in layers}
    for t in teachers:
        if layers:
            fs, out = t.model(x, is_feat=True)
            for name, i in layers.items():
                feats[name].append(fs[i])
        else:
            out = t.model(x)
        logits.append(out)
    return torch.stack(logits, dim=1), feats
