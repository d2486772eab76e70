"""``avg`` (AVER-MKD): the mean over teachers of the per-teacher KD loss.

Reference: CA-MKD ``helper/loops.py``, ``ensemble_method == "AVERAGE_LOSS"``:
``torch.stack([DistillKL(s, t_k) for k]).mean(0)``.
"""

from __future__ import annotations

from torch import Tensor

from camkd.methods.base import LogitMethod, TeacherOut, register_method
from camkd.methods.functional import distill_kl


def avg_mkd_loss(student_logits: Tensor, teacher_logits: Tensor, *, T: float, kept: Tensor | None = None) -> Tensor:
    """``(1/K) sum_k KL_T(s || t_k)`` with each KL summed over classes, times T^2, divided by B
    (with ``kept``: over the kept classes plus a tail bin)."""
    return distill_kl(student_logits, teacher_logits, T=T, kept=kept).mean()


@register_method("avg")
class AverMKD(LogitMethod):
    """gamma * CE + alpha * mean_k DistillKL(s, t_k)."""

    def kd_term(self, student_logits: Tensor, teachers: TeacherOut, labels: Tensor) -> tuple[Tensor, Tensor]:
        return avg_mkd_loss(student_logits, teachers.logits, T=self.kd_T, kept=teachers.kept), self.uniform_weights(student_logits)
