"""``ebkd``: entropy-based teacher weights (Kwon et al., ICASSP 2020), as in the CA-MKD reference.

Reference: CA-MKD ``helper/loops.py``, ``ensemble_method == "EBKD"``: per sample,
``H_k = -sum_c p_k log p_k`` with ``p_k = softmax(z_k)`` (temperature 1, natural
log), ``w_k = 1 - H_k / sum_j H_j``, and
``loss = sum_{k,b} w_kb * KL_T(s_b || t_kb) / (B * K)`` with the per-sample KL
summed over classes and times T^2.  The weights sum to K - 1 over teachers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from camkd.methods.base import Diagnostics, Losses, Method, StudentOut, TeacherOut, register_method
from camkd.methods.functional import cross_entropy, kl_per_sample


def ebkd_weights(teacher_logits: Tensor) -> Tensor:
    """[B, K] weights ``1 - H_k / sum_j H_j`` from the teachers' entropies at T = 1.

    Entropies are computed from log-probabilities (finite where the reference's
    ``p * log(p)`` gives NaN for p = 0).  K == 1: weight 1 (the reference routes a
    single teacher to AVERAGE_LOSS, i.e. plain KD).  If every teacher has zero
    entropy on a sample, the ratio is taken as 1/K (weights (K-1)/K each) instead
    of the reference's 0/0.
    """
    t = teacher_logits.float()
    K = t.shape[1]
    if K == 1:
        return torch.ones(t.shape[:2], dtype=t.dtype, device=t.device)
    logp = F.log_softmax(t, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)  # [B, K]
    total = ent.sum(1, keepdim=True)
    ratio = torch.where(total > 0, ent / total.clamp_min(torch.finfo(t.dtype).tiny), 1.0 / K)
    return 1.0 - ratio


def ebkd_loss(student_logits: Tensor, teacher_logits: Tensor, *, T: float) -> tuple[Tensor, Tensor]:
    """(``sum_{k,b} w_kb KL_T,kb / (B K)``, weights [B, K])."""
    w = ebkd_weights(teacher_logits)
    kl = kl_per_sample(student_logits, teacher_logits, T=T)  # [B, K]
    B, K = kl.shape
    return (w * kl).sum() / (B * K), w


@register_method("ebkd")
class EBKD(Method):
    """gamma * CE + alpha * entropy-weighted KD."""

    def forward(
        self, student: StudentOut, teachers: TeacherOut, labels: Tensor, *, epoch: int
    ) -> tuple[Losses, Diagnostics]:
        self.check_inputs(student, teachers, labels)
        kd, w = ebkd_loss(student.logits, teachers.logits, T=self.kd_T)
        losses = {"ce": self.gamma * cross_entropy(student.logits, labels), "kd": self.alpha * kd}
        # reported as shares summing to 1 (the raw weights sum to K - 1)
        share = w.mean(0) / w.mean(0).sum()
        return losses, {"teacher_weights": share.tolist()}
