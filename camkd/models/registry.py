"""The model registry: arch name -> a function building a :class:`~camkd.models.base.Classifier`.

Every registered model keeps the contract written in :mod:`camkd.models.base` (``model(x, is_feat=True)`` gives
``(feats, logits)``, ``model.get_head()(feats[-2])`` reproduces the logits). The CIFAR zoo registers through
:func:`register_model`; torchvision's and timm's models register ``tv:NAME`` and the prefix family ``timm:NAME``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from camkd.errors import CamkdError
from camkd.models.base import Classifier
from camkd.registry import Registry

EntryFn = Callable[..., Classifier]

# filled by the architecture modules, which camkd/models/__init__.py imports; names are looked up case-insensitively
MODELS: Registry[EntryFn] = Registry("arch", ignore_case=True)


def register_model(fn: EntryFn) -> EntryFn:
    """Decorator: register an entry function ``fn(*, num_classes, in_channels=3)`` under its name."""
    name = fn.__name__

    @functools.wraps(fn)
    def entry(*, num_classes: int, in_channels: int = 3) -> Classifier:
        model = fn(num_classes=num_classes, in_channels=in_channels)
        model.arch = name
        return model

    MODELS.add(name, entry)
    return entry


def list_models() -> list[str]:
    """All registered architecture names, sorted."""
    return MODELS.names()


def resolve_arch(name: str) -> str:
    """The registered spelling of architecture ``name`` (exact, then case-insensitive); unknown names are refused."""
    return MODELS.resolve(name)


def create_model(name: str, *, num_classes: int, in_channels: int = 3) -> Classifier:
    """Build a registered model by name (exact match first, then case-insensitive)."""
    entry = MODELS.get(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise CamkdError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise CamkdError(f"in_channels must be a positive integer, got {in_channels!r}")
    return entry(num_classes=num_classes, in_channels=in_channels)


__all__ = [
    "MODELS",
    "create_model",
    "list_models",
    "register_model",
    "resolve_arch",
]
