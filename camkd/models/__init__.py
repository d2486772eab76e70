"""CIFAR model zoo (RepDistiller / CA-MKD architectures) behind a name registry.

Importing this package registers every architecture (one import line per module below);
use :func:`create_model`.
"""

from __future__ import annotations

from camkd.models import mobilenetv2, resnet, shufflenetv1, shufflenetv2, timm_models, tv, vgg, wrn  # noqa: F401 - registration on import
from camkd.models.registry import (
    MODELS,
    CifarModel,
    ClassifierHead,
    create_model,
    list_models,
    register_model,
    resolve_arch,
)

__all__ = [
    "MODELS",
    "CifarModel",
    "ClassifierHead",
    "create_model",
    "list_models",
    "register_model",
    "resolve_arch",
]
