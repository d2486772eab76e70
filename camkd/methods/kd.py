"""``kd``: Hinton KD against the mean of the teachers' logits (K = 1: plain KD)."""

from __future__ import annotations

from torch import Tensor

from camkd.methods.base import Diagnostics, Losses, Method, StudentOut, TeacherOut, register_method
from camkd.methods.functional import cross_entropy, distill_kl


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, T: float) -> Tensor:
    """``DistillKL(T)(s, mean_k z_k)``: KL(softmax(mean_k z_k / T) || softmax(s / T)) * T^2 / B.

    ``teacher_logits`` is [B, K, C]; the teachers are averaged in logit space.
    """
    return distill_kl(student_logits, teacher_logits.float().mean(1), T=T)


@register_method("kd")
class KD(Method):
    """gamma * CE + alpha * KD(student, mean teacher logits)."""

    def forward(
        self, student: StudentOut, teachers: TeacherOut, labels: Tensor, *, epoch: int
    ) -> tuple[Losses, Diagnostics]:
        self.check_inputs(student, teachers, labels)
        losses = {
            "ce": self.gamma * cross_entropy(student.logits, labels),
            "kd": self.alpha * kd_loss(student.logits, teachers.logits, T=self.kd_T),
        }
        return losses, {"teacher_weights": self.uniform_weights()}
