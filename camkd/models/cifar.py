"""The CIFAR zoo's base (RepDistiller / CA-MKD architectures): :class:`CifarModel`, its init and its pool.

A CIFAR model says which feature maps it takes (:meth:`CifarModel.feature_maps`) and which of its layers map the
last one to logits (:meth:`CifarModel.head_layers`); :class:`CifarModel` makes the :class:`Classifier` contract
of those: ``feats`` are the feature maps at the reference positions followed by the pooled, flattened vector,
and ``get_head()`` holds the head layers, so its keys are the model's (``fc.weight``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from torch import Tensor, nn

from camkd.models.base import Classifier, ClassifierHead


class CifarModel(Classifier):
    """Base class of the CIFAR zoo: subclasses implement :meth:`feature_maps` and :meth:`head_layers`."""

    def __init__(self, *, num_classes: int, in_channels: int) -> None:
        super().__init__(arch=type(self).__name__, num_classes=num_classes, in_channels=in_channels)

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


__all__ = ["CifarModel", "global_pool", "init_weights"]
