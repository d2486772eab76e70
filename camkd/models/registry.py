"""Model registry and the contract every CIFAR model follows.

Every architecture subclasses :class:`CifarModel`: ``model(x)`` gives logits and
``model(x, is_feat=True)`` gives ``(feats, logits)`` where ``feats`` are the
feature maps at the reference positions (RepDistiller / CA-MKD) followed by the
pooled, flattened vector.  ``feats[-2]`` is the last feature map and
``model.get_head()(feats[-2])`` reproduces the logits.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

from camkd.errors import CamkdError
from camkd.registry import Registry

EntryFn = Callable[..., "CifarModel"]

# filled by the architecture modules, which camkd/models/__init__.py imports; names are looked up case-insensitively
MODELS: Registry[EntryFn] = Registry("arch", ignore_case=True)


class ClassifierHead(nn.Sequential):
    """The part of a model after ``feats[-2]``, built from the model's own modules.

    It holds references (not copies) to the model's layers, so it shares their
    parameters; its ``state_dict()`` keys are the model's own keys for those layers
    (e.g. ``fc.weight``), so a head's weights load into a fresh head of the same arch.
    """

    def __init__(self, layers: OrderedDict[str, nn.Module]) -> None:
        super().__init__(layers)


class CifarModel(nn.Module):
    """Base class: subclasses implement :meth:`feature_maps` and :meth:`head_layers`."""

    arch: str

    def __init__(self, *, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.arch = type(self).__name__
        self.num_classes = num_classes
        self.in_channels = in_channels

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """The reference's feature maps, in order; the last one feeds the head."""
        raise NotImplementedError

    def head_layers(self) -> OrderedDict[str, nn.Module]:
        """Named layers that map the last feature map to logits; the last is the classifier."""
        raise NotImplementedError

    def get_head(self) -> ClassifierHead:
        """A new head module sharing this model's parameters (not a child of the model)."""
        return ClassifierHead(self.head_layers())

    def forward(self, x: Tensor, is_feat: bool = False) -> Tensor | tuple[list[Tensor], Tensor]:
        feats = self.feature_maps(x)
        *body, classifier = self.head_layers().values()
        out = feats[-1]
        for layer in body:
            out = layer(out)
        logits = classifier(out)
        if is_feat:
            return [*feats, out], logits
        return logits


def init_weights(model: nn.Module, *, linear: Literal["default", "zero_bias", "normal"]) -> None:
    """RepDistiller's init: He-normal (fan-out) convs with zero bias, BN to identity.

    ``linear`` picks what happens to Linear layers: left at PyTorch's default
    (resnet), bias zeroed (wrn), or N(0, 0.01) weights with zero bias (vgg, mobilenetv2).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear != "default":
            if linear == "normal":
                nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def global_pool() -> nn.Module:
    """Global average pooling to 1x1 (replaces the reference's fixed-size pools; no parameters)."""
    return nn.AdaptiveAvgPool2d(1)


def register_model(fn: EntryFn) -> EntryFn:
    """Decorator: register an entry function ``fn(*, num_classes, in_channels=3)`` under its name."""
    name = fn.__name__

    @functools.wraps(fn)
    def entry(*, num_classes: int, in_channels: int = 3) -> CifarModel:
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


def create_model(name: str, *, num_classes: int, in_channels: int = 3) -> CifarModel:
    """Build a registered model by name (exact match first, then case-insensitive)."""
    entry = MODELS.get(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise CamkdError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise CamkdError(f"in_channels must be a positive integer, got {in_channels!r}")
    return entry(num_classes=num_classes, in_channels=in_channels)


__all__ = [
    "ClassifierHead",
    "CifarModel",
    "create_model",
    "global_pool",
    "init_weights",
    "list_models",
    "register_model",
    "resolve_arch",
]
