"""The distillation-method contract, its inputs, and the one method registry.

A method turns the student's outputs, the teachers' (live or cached) outputs and
the labels into named loss terms, each already multiplied by its coefficient, so
the training loop only sums them, and diagnostics: detached tensors on the logits'
device (see :data:`Diagnostics`), so a step never waits on the host.  Trainable parts of a method (per-teacher
Embeds, ConvRegs) are submodules of the :class:`Method`; the loop optimizes
``method.parameters()`` together with the student, as the reference's
``trainable_list`` does.

Adding a method is one file (a pure loss function at the top, then a thin
``@register_method("name")`` subclass, usually of :class:`LogitMethod`: its
``kd_term`` calls the pure function) plus one import line in
``camkd/methods/__init__.py``, which imports every method module, so importing the
package (or any module in it) fills the registry :data:`METHODS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from camkd.config import LossConfig
from camkd.errors import CamkdError
from camkd.methods.functional import cross_entropy
from camkd.registry import Registry

Shape = tuple[int, ...]
Losses = dict[str, Tensor]
# Detached tensors on the logits' device, never read on the host by a method (no
# sync per step).  "teacher_weights": float32 [K], each teacher's share of this
# batch's teacher term (sums to 1); every method that uses teachers sets it.
# camkd from epoch 2 also sets "inter_weights" (float32 [K], sums to 1).
Diagnostics = dict[str, Tensor]


@dataclass
class StudentOut:
    """The student's outputs for one batch."""

    logits: Tensor  # [B, C] float32
    feats: list[Tensor] = field(default_factory=list)  # the student's ``is_feat`` list


@dataclass
class TeacherOut:
    """The K teachers' outputs for the same batch (from the cache or run live)."""

    logits: Tensor  # [B, K, C] float32
    # layer name -> per-teacher [B, c, h, w]; names: "penultimate" (teacher feats[-2])
    # and "hint<L>" (teacher feats[L])
    features: dict[str, list[Tensor]] = field(default_factory=dict)
    # each teacher's frozen classifier head (maps its feats[-2] to logits)
    heads: list[nn.Module] = field(default_factory=list)
    # from a top-k store (store/topk.py): ``logits`` are T x log-probabilities at ``temperature`` with
    # the tail mass spread over the classes not kept; ``kept`` [B, K, C] bool marks the kept ones (KLs
    # use them plus one tail bin); ``ce`` [B, K] and ``log_entropy`` [B, K] are the exact float32 values
    # at T = 1 the weights need.  All None for dense logits.
    kept: Tensor | None = None
    ce: Tensor | None = None
    log_entropy: Tensor | None = None
    temperature: float | None = None

    def slice(self, sl: slice) -> TeacherOut:
        """The same outputs for rows ``sl`` of the batch."""
        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[sl]

        return TeacherOut(logits=self.logits[sl], features={k: [f[sl] for f in v] for k, v in self.features.items()},
                          heads=self.heads, kept=cut(self.kept), ce=cut(self.ce), log_entropy=cut(self.log_entropy),
                          temperature=self.temperature)


@dataclass(frozen=True)
class MethodConfig:
    """Everything :func:`create_method` knows; each method reads what it needs."""

    num_classes: int
    num_teachers: int
    student_feat_shapes: tuple[Shape, ...]
    teacher_feat_shapes: dict[str, tuple[Shape, ...]]
    loss: LossConfig  # checked by create_method; beta None: the method's reference default


class Method(nn.Module):
    """Base class of a distillation method (see the module docstring)."""

    name: str = ""
    default_beta: float = 0.0  # the reference's ``-b`` for this method

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__()
        self.num_classes = cfg.num_classes
        self.num_teachers = cfg.num_teachers
        self.gamma = float(cfg.loss.gamma)
        self.alpha = float(cfg.loss.alpha)
        self.beta = float(self.default_beta if cfg.loss.beta is None else cfg.loss.beta)
        self.kd_T = float(cfg.loss.kd_T)

    @classmethod
    def features_needed(cls, *, beta: float, hint_layer: int) -> tuple[str, ...]:
        """The feature layers an instance built with these options needs (known before building it)."""
        return ()

    def forward(self, student: StudentOut, teachers: TeacherOut, labels: Tensor, *, epoch: int,
                stats: Tensor | None = None) -> tuple[Losses, Diagnostics]:
        """Return (losses already scaled by their coefficients, diagnostics).

        ``stats``: the sum of :meth:`batch_stats` over every slice of the global batch, when the
        batch is split over ranks or micro-batches; None means this batch is the whole batch.
        """
        raise NotImplementedError

    def batch_stats(self, student_logits: Tensor, teachers: TeacherOut) -> Tensor | None:
        """Detached sums over this slice's samples of what the loss needs from the whole batch, or None.

        A method whose loss depends on the batch as a whole (AEKD's batch-mean gradients) returns
        them; the loop sums them over the slices of the global batch (micro-batches in order, then
        ranks by all-reduce) and passes the total back to :meth:`forward` as ``stats``.
        """
        return None

    # ----------------------------------------------------------------- helpers
    def check_inputs(self, student: StudentOut, teachers: TeacherOut, labels: Tensor) -> None:
        """Cheap shape checks (metadata only, no device sync)."""
        s, t = student.logits, teachers.logits
        if s.dim() != 2 or s.shape[1] != self.num_classes:
            raise CamkdError(f"{self.name}: student logits must be [B, {self.num_classes}], got {list(s.shape)}")
        if self.uses_teachers() and (t.dim() != 3 or t.shape[0] != s.shape[0] or t.shape[1:] != (self.num_teachers, s.shape[1])):
            raise CamkdError(
                f"{self.name}: teacher logits must be [B, K={self.num_teachers}, C={s.shape[1]}]"
                f" with B={s.shape[0]}, got {list(t.shape)}"
            )
        if labels.shape != (s.shape[0],):
            raise CamkdError(f"{self.name}: labels must be [B={s.shape[0]}], got {list(labels.shape)}")
        if teachers.kept is not None and self.uses_teachers() and teachers.temperature != self.kd_T:
            raise CamkdError(f"{self.name}: the top-k teacher logits were rebuilt at T={teachers.temperature}, "
                             f"the method distills at T={self.kd_T}")

    def trained_parameters(self, epoch: int) -> list[nn.Parameter]:
        """The method's parameters that get a gradient in ``epoch``: all of them, unless a term that uses them is
        off then. A function of the epoch alone, so every rank averages the same ones (see ``fit``)."""
        return list(self.parameters())

    @classmethod
    def uses_teachers(cls) -> bool:
        """Whether the method reads the teachers' outputs at all (``ce`` does not)."""
        return True

    @classmethod
    def loss_options(cls) -> tuple[str, ...]:
        """The :class:`LossConfig` fields the method reads (an option given for another field does nothing)."""
        return ("gamma",)

    def uniform_weights(self, like: Tensor) -> Tensor:
        """Equal shares [K] (float32) on ``like``'s device."""
        return torch.full((self.num_teachers,), 1.0 / self.num_teachers, device=like.device)


class LogitMethod(Method):
    """``gamma CE + alpha kd_term`` (+ ``beta feature_term`` from epoch 2, if the method has one).

    A subclass gives :meth:`kd_term` (its pure KD loss and the teachers' shares) and,
    for a feature-level term, ``feature_loss`` (the loss's name) and
    :meth:`feature_term`.  As in the reference's loop, every ``-b`` term is 0 in epoch 1.
    """

    feature_loss: str = ""  # name of the beta term; "" for none

    @classmethod
    def loss_options(cls) -> tuple[str, ...]:
        return ("gamma", "alpha", "kd_T") + (("beta",) if cls.feature_loss else ())

    def kd_term(self, student_logits: Tensor, teachers: TeacherOut, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(unscaled KD loss, the teachers' shares [K] of this batch, summing to 1).

        ``teachers.logits`` [B, K, C]; from a top-k store also ``kept``, ``ce``, ``log_entropy``
        (see :class:`TeacherOut`), which the pure loss functions take as keyword arguments.
        """
        raise NotImplementedError

    def feature_term(self, student: StudentOut, teachers: TeacherOut, labels: Tensor) -> tuple[Tensor, Diagnostics]:
        """(unscaled feature loss, extra diagnostics)."""
        raise NotImplementedError

    def trained_parameters(self, epoch: int) -> list[nn.Parameter]:
        """None in epoch 1 when there is a feature term: it is 0 then, and its modules (Embeds, ConvRegs, the
        method's only parameters) are not run, so they get no gradient, momentum or weight decay."""
        if epoch <= 1 and self.feature_loss and self.beta > 0:
            return []
        return super().trained_parameters(epoch)

    def forward(self, student: StudentOut, teachers: TeacherOut, labels: Tensor, *, epoch: int,
                stats: Tensor | None = None) -> tuple[Losses, Diagnostics]:
        self.check_inputs(student, teachers, labels)
        extra_args = {} if stats is None else {"stats": stats}  # only methods with batch_stats take them
        kd, shares = self.kd_term(student.logits, teachers, labels, **extra_args)
        losses = {"ce": self.gamma * cross_entropy(student.logits, labels), "kd": self.alpha * kd}
        diags: Diagnostics = {"teacher_weights": shares.detach().float()}
        if self.feature_loss and self.beta > 0:
            if epoch <= 1:
                losses[self.feature_loss] = student.logits.new_zeros((), dtype=torch.float32)
            else:
                term, extra = self.feature_term(student, teachers, labels)
                losses[self.feature_loss] = self.beta * term
                diags.update(extra)
        return losses, diags


MethodClass = type[Method]
METHODS: Registry[MethodClass] = Registry("method")  # filled by the method modules, which camkd/methods/__init__.py imports


def register_method(name: str) -> Callable[[MethodClass], MethodClass]:
    """Class decorator: register a :class:`Method` subclass under ``name``."""

    def deco(cls: MethodClass) -> MethodClass:
        cls.name = name
        METHODS.add(name, cls)
        return cls

    return deco


def list_methods() -> list[str]:
    """All registered method names, sorted."""
    return METHODS.names()


LOSS_FLAGS = {"gamma": "-r/--gamma", "alpha": "-a/--alpha", "beta": "-b/--beta", "kd_T": "--kd-T", "aekd_C": "--aekd-C",
              "hint_layer": "--hint-layer"}  # LossConfig field -> the distill option that sets it


def _positive_int(what: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise CamkdError(f"{what} must be a positive integer, got {v!r}")
    return v


def _finite(what: str, v: object, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise CamkdError(f"{what} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise CamkdError(f"{what} must be > 0, got {v!r}")
    if not positive and v < 0:
        raise CamkdError(f"{what} must be >= 0, got {v!r}")
    return float(v)


def resolve_loss(name: str, loss: LossConfig) -> LossConfig:
    """``loss`` with the values method ``name`` will use: a defaulted beta (None) becomes the method's reference
    default, so a run records (and a resume compares) the number it trained with."""
    cls = METHODS.get(name)
    return loss if loss.beta is not None else replace(loss, beta=float(cls.default_beta))


def required_layers(name: str, loss: LossConfig) -> tuple[str, ...]:
    """Teacher feature layers method ``name`` needs with these options, before it is built."""
    resolved = resolve_loss(name, loss)
    return METHODS.get(name).features_needed(beta=float(resolved.beta), hint_layer=loss.hint_layer)


def method_uses_teachers(name: str) -> bool:
    """Whether method ``name`` reads the teachers' outputs (known before building it)."""
    return METHODS.get(name).uses_teachers()


def check_given_options(name: str, given: list[str]) -> None:
    """Refuse loss options (LossConfig field names) given explicitly that method ``name`` does not read."""
    unused = [o for o in given if o not in METHODS.get(name).loss_options()]
    if not unused:
        return
    users = {o: [m for m in list_methods() if o in METHODS.get(m).loss_options()] for o in unused}
    parts = [f"{LOSS_FLAGS[o]} (used by {', '.join(users[o])})" for o in unused]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    verb, it = ("does", "it") if len(parts) == 1 else ("do", "them")
    raise CamkdError(f"{text} {verb} nothing with --method {name}; drop {it} or choose a method that uses {it}")


def _checked_loss(loss: LossConfig) -> LossConfig:
    if isinstance(loss.hint_layer, bool) or not isinstance(loss.hint_layer, int):
        raise CamkdError(f"{LOSS_FLAGS['hint_layer']} must be an integer, got {loss.hint_layer!r}")
    return LossConfig(
        gamma=_finite(LOSS_FLAGS["gamma"], loss.gamma),
        alpha=_finite(LOSS_FLAGS["alpha"], loss.alpha),
        beta=None if loss.beta is None else _finite(LOSS_FLAGS["beta"], loss.beta),
        kd_T=_finite(LOSS_FLAGS["kd_T"], loss.kd_T, positive=True),
        aekd_C=_finite(LOSS_FLAGS["aekd_C"], loss.aekd_C, positive=True),
        hint_layer=loss.hint_layer,
    )


def create_method(
    name: str,
    *,
    num_classes: int,
    num_teachers: int,
    student_feat_shapes: list[tuple[int, ...]],
    teacher_feat_shapes: dict[str, list[tuple[int, ...]]],
    loss: LossConfig | None = None,
) -> Method:
    """Build the method ``name``.

    ``student_feat_shapes``: the shapes (without batch) of the student's feats list;
    ``teacher_feat_shapes``: layer name -> per-teacher shapes (without batch) for the
    layers the method needs; ``loss``: the coefficients (default: :class:`LossConfig`'s).
    """
    cls = METHODS.get(name)
    cfg = MethodConfig(
        num_classes=_positive_int("num_classes", num_classes),
        num_teachers=_positive_int("num_teachers", num_teachers),
        student_feat_shapes=tuple(tuple(int(d) for d in s) for s in student_feat_shapes),
        teacher_feat_shapes={k: tuple(tuple(int(d) for d in s) for s in v) for k, v in teacher_feat_shapes.items()},
        loss=_checked_loss(loss or LossConfig()),
    )
    return cls(cfg)


# --------------------------------------------------------------- shape helpers
def teacher_shapes(cfg: MethodConfig, layer: str, method: str) -> tuple[Shape, ...]:
    """The K per-teacher shapes of ``layer``, each checked to be a (C, H, W) map."""
    shapes = cfg.teacher_feat_shapes.get(layer)
    if shapes is None:
        raise CamkdError(f"{method} needs teacher features {layer!r}, which were not given")
    if len(shapes) != cfg.num_teachers:
        raise CamkdError(f"{method}: teacher features {layer!r} have {len(shapes)} shapes for {cfg.num_teachers} teachers")
    for k, s in enumerate(shapes):
        if len(s) != 3 or min(s) < 1:
            raise CamkdError(f"{method}: teacher {k} feature {layer!r} has shape {s}; a (C, H, W) feature map is needed")
    return shapes


def per_teacher_modules(
    cfg: MethodConfig,
    build: Callable[[Shape, Shape], nn.Module],
    *,
    index: int,
    layer: str,
    method: str,
    enabled: bool = True,
) -> nn.ModuleList:
    """``build(student feats[index] shape, teacher k's layer shape)`` for each teacher k (shapes checked).

    Empty (and nothing checked) when not ``enabled``, e.g. with beta = 0.
    """
    if not enabled:
        return nn.ModuleList()
    s = student_shape(cfg, index, method)
    return nn.ModuleList(build(s, t) for t in teacher_shapes(cfg, layer, method))


def student_shape(cfg: MethodConfig, index: int, method: str) -> Shape:
    """The student's feats[index] shape, checked to be a (C, H, W) map."""
    n = len(cfg.student_feat_shapes)
    if not -n <= index < n:
        raise CamkdError(f"{method}: the student has {n} feature outputs, so feats[{index}] does not exist")
    s = cfg.student_feat_shapes[index]
    if len(s) != 3 or min(s) < 1:
        raise CamkdError(f"{method}: student feats[{index}] has shape {s}; a (C, H, W) feature map is needed")
    return s
