"""``ce``: the student alone, ``gamma * CE`` (RepDistiller ``train_vanilla``)."""

from __future__ import annotations

from torch import Tensor

from camkd.methods.base import Diagnostics, Losses, Method, StudentOut, TeacherOut, register_method
from camkd.methods.functional import cross_entropy


def ce_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of the student against the labels."""
    return cross_entropy(student_logits, labels)


@register_method("ce")
class CE(Method):
    """Cross-entropy only; teachers are ignored (no diagnostics: no ``teacher_weights`` key)."""

    @classmethod
    def uses_teachers(cls) -> bool:
        return False

    def forward(self, student: StudentOut, teachers: TeacherOut, labels: Tensor, *, epoch: int,
                stats: Tensor | None = None) -> tuple[Losses, Diagnostics]:
        self.check_inputs(student, teachers, labels)
        return {"ce": self.gamma * ce_loss(student.logits, labels)}, {}
