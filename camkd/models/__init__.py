"""The model zoo behind a name registry: the CIFAR zoo (RepDistiller / CA-MKD architectures), torchvision's
models as ``tv:NAME`` and timm's as ``timm:NAME``, every one a :class:`Classifier` (the contract in ``base.py``).

Importing this package registers every architecture (one import line per module below);
use :func:`create_model`.
"""

from __future__ import annotations

from camkd.models import mobilenetv2, resnet, shufflenetv1, shufflenetv2, timm_models, tv, vgg, wrn  # noqa: F401 - registration on import
from camkd.models.base import Classifier, ClassifierHead
from camkd.models.cifar import CifarModel
from camkd.models.registry import (
    MODELS,
    create_model,
    list_models,
    register_model,
    resolve_arch,
)

__all__ = [
    "MODELS",
    "CifarModel",
    "Classifier",
    "ClassifierHead",
    "create_model",
    "list_models",
    "register_model",
    "resolve_arch",
]
