"""Distillation methods behind one registry; importing this package registers them all.

Each method is one module: a pure loss function over tensors at the top and a thin
:class:`Method` subclass registered with ``@register_method``.  Adding a method is a
new module plus its name in the import line below.
"""

from __future__ import annotations

from camkd.methods import aekd, avg, camkd, ce, ebkd, fitnet, kd  # noqa: F401 - registration happens on import
from camkd.methods.base import (
    METHODS,
    Diagnostics,
    LogitMethod,
    Method,
    MethodConfig,
    StudentOut,
    TeacherOut,
    check_given_options,
    create_method,
    list_methods,
    method_uses_teachers,
    register_method,
    required_layers,
    resolve_loss,
)

__all__ = [
    "METHODS",
    "Diagnostics",
    "LogitMethod",
    "Method",
    "MethodConfig",
    "StudentOut",
    "TeacherOut",
    "check_given_options",
    "create_method",
    "list_methods",
    "method_uses_teachers",
    "register_method",
    "required_layers",
    "resolve_loss",
]
