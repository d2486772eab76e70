"""ImageNet-1k teachers on ImageNet's subsets: keep the rows of the dataset's classes.

The class folders of Imagenette, Imagewoof, ImageNet-100 and tiny-imagenet are ImageNet wnids (``n01440764``). A
teacher with 1000 outputs in ImageNet-1k's order (class i is the i-th of ImageNet-1k's 1000 wnids, sorted) fits such a
dataset once its classifier keeps only the rows of the dataset's classes, in the dataset's class order: its logits
are then the full logits' columns of those classes, and its head (CA-MKD's feature term) predicts the same classes.

:func:`class_rows` finds the rows (every class folder must be an ImageNet-1k wnid, checked); :func:`restrict_classes`
cuts the classifier in place. The wnid list is timm's own metadata (``timm.data.ImageNetInfo``), not a copy in camkd.
Every path that runs a teacher restricts it the same way, so cached == online holds for a restricted teacher.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from camkd.errors import CamkdError

IMAGENET1K = 1000
_WNID = re.compile(r"n\d{8}")


def imagenet_wnids() -> tuple[str, ...]:
    """ImageNet-1k's 1000 wnids in class order (sorted), from timm's metadata."""
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        raise CamkdError("ImageNet-1k's class list comes from timm: pip install 'camkd[timm]'") from None
    wnids = tuple(ImageNetInfo().label_names())
    if len(wnids) != IMAGENET1K or list(wnids) != sorted(wnids):  # what the mapping assumes; a changed timm would say so
        raise CamkdError(f"timm's ImageNet-1k class list has {len(wnids)} entries, not 1000 sorted wnids; check the timm version")
    return wnids


def are_wnids(classes: Sequence[str] | None) -> bool:
    """Whether every class name is a wnid (``n`` and 8 digits)."""
    return bool(classes) and all(_WNID.fullmatch(c) for c in classes)


def class_rows(classes: Sequence[str]) -> list[int]:
    """Rows of ImageNet-1k's 1000 outputs for ``classes`` (wnids), in their order; one line naming what is not an
    ImageNet-1k class."""
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    unknown = [c for c in classes if c not in index]
    if unknown:
        which = f"class folder {unknown[0]} is" if len(unknown) == 1 else f"{len(unknown)} class folders (e.g. {unknown[0]}) are"
        raise CamkdError(f"{which} not among ImageNet-1k's 1000 classes, which an ImageNet-1k teacher predicts; keep only "
                         f"ImageNet-1k classes in the dataset, or use teachers trained on it")
    return [index[c] for c in classes]


def not_wnids(classes: Sequence[str] | None) -> list[str]:
    """The class names that are not wnids."""
    return [c for c in classes or () if not _WNID.fullmatch(c)]


def subset_rows(num_outputs: int, classes: Sequence[str] | None) -> list[int] | None:
    """The rows an ``num_outputs``-class teacher keeps for a dataset with these class names: the wnids' rows when the
    teacher has ImageNet-1k's 1000 outputs and the dataset's classes are other ImageNet-1k wnids; None when the
    teacher's outputs are the dataset's classes as they are (or the dataset is no ImageNet subset)."""
    if num_outputs != IMAGENET1K or not are_wnids(classes) or len(classes) == IMAGENET1K:
        return None
    return class_rows(classes)


def classifier(model: nn.Module) -> nn.Linear:
    """The model's last Linear layer with ``num_classes`` outputs (its classifier): the head's last such layer."""
    head = model.get_head()
    found = [m for m in head.modules() if isinstance(m, nn.Linear) and m.out_features == model.num_classes]
    if not found:
        raise CamkdError(f"{model.arch} has no Linear classifier with {model.num_classes} outputs; its classes cannot be restricted")
    return found[-1]


def classifier_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of the model's classifier's parameters (weight, bias)."""
    fc = classifier(model)
    return {name for name, t in model.named_parameters() if any(t is q for q in fc.parameters())}


@torch.no_grad()
def restrict_classes(model: nn.Module, rows: Sequence[int]) -> nn.Module:
    """Keep the classifier rows ``rows`` (in that order), in place: the module objects stay (the wrappers' heads and
    timm's own modules hold the same ones), their weight and bias become the kept rows; ``num_classes`` follows."""
    fc = classifier(model)
    index = torch.as_tensor(list(rows), dtype=torch.long, device=fc.weight.device)
    fc.weight = nn.Parameter(fc.weight.index_select(0, index).clone(), requires_grad=fc.weight.requires_grad)
    if fc.bias is not None:
        fc.bias = nn.Parameter(fc.bias.index_select(0, index).clone(), requires_grad=fc.bias.requires_grad)
    fc.out_features = len(rows)
    model.num_classes = len(rows)
    net = model.__dict__.get("net")  # timm's own model under camkd's wrapper
    if net is not None and hasattr(net, "num_classes"):
        net.num_classes = len(rows)
    return model
