"""``kd``: Hinton KD against the mean of the teachers' logits (K = 1: plain KD)."""

from __future__ import annotations

from torch import Tensor

from camkd.methods.base import LogitMethod, TeacherOut, register_method
from camkd.methods.functional import distill_kl


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, T: float, kept: Tensor | None = None) -> Tensor:
    """``DistillKL(T)(s, mean_k z_k)``: KL(softmax(mean_k z_k / T) || softmax(s / T)) * T^2 / B.

    ``teacher_logits`` is [B, K, C]; the teachers are averaged in logit space.  With ``kept`` (top-k)
    the KL keeps the classes any teacher kept and bins the rest; a class one teacher kept and another
    did not averages in the other's evenly spread tail (not bounded by the tail mass: see README).
    """
    union = None if kept is None else kept.any(1)
    return distill_kl(student_logits, teacher_logits.float().mean(1), T=T, kept=union)


@register_method("kd")
class KD(LogitMethod):
    """gamma * CE + alpha * KD(student, mean teacher logits)."""

    def kd_term(self, student_logits: Tensor, teachers: TeacherOut, labels: Tensor) -> tuple[Tensor, Tensor]:
        return kd_loss(student_logits, teachers.logits, T=self.kd_T, kept=teachers.kept), self.uniform_weights(student_logits)
