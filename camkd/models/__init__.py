"""CIFAR model zoo (RepDistiller / CA-MKD architectures) behind a name registry.

Importing this package registers every architecture; use :func:`create_model`.
"""

from __future__ import annotations

from camkd.models import mobilenetv2, resnet, shufflenetv1, shufflenetv2, vgg, wrn
from camkd.models.registry import (
    CifarModel,
    ClassifierHead,
    create_model,
    list_models,
    register_model,
)
from camkd.models.registry import _resolve as resolve_arch  # noqa: F401 - checks a name, raises CamkdError

__all__ = [
    "CifarModel",
    "ClassifierHead",
    "create_model",
    "list_models",
    "mobilenetv2",
    "register_model",
    "resolve_arch",
    "resnet",
    "shufflenetv1",
    "shufflenetv2",
    "vgg",
    "wrn",
]
