"""Distillation methods behind one registry; importing this package registers them all.

Each method is one module: a pure loss function over tensors at the top and a thin
:class:`Method` subclass registered with ``@register_method``.  Adding a method is a
new module plus one import line below.
"""

from __future__ import annotations

from camkd.methods.base import (  # noqa: E402
    Diagnostics,
    LogitMethod,
    Method,
    MethodConfig,
    StudentOut,
    TeacherOut,
    create_method,
    list_methods,
    method_uses_teachers,
    register_method,
    required_layers,
)

# one line per method (registration happens on import)
from camkd.methods import ce  # noqa: E402,F401  isort: skip
from camkd.methods import kd  # noqa: E402,F401  isort: skip
from camkd.methods import avg  # noqa: E402,F401  isort: skip
from camkd.methods import ebkd  # noqa: E402,F401  isort: skip
from camkd.methods import aekd  # noqa: E402,F401  isort: skip
from camkd.methods import fitnet  # noqa: E402,F401  isort: skip
from camkd.methods import camkd  # noqa: E402,F401  isort: skip

__all__ = [
    "Diagnostics",
    "LogitMethod",
    "Method",
    "MethodConfig",
    "StudentOut",
    "TeacherOut",
    "create_method",
    "list_methods",
    "method_uses_teachers",
    "register_method",
    "required_layers",
]
