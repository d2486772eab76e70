"""``ebkd``: entropy-based teacher weights (Kwon et al., ICASSP 2020), as in the CA-MKD reference.

Reference: CA-MKD ``helper/loops.py``, ``ensemble_method == "EBKD"``: per sample,
``H_k = -sum_c p_k log p_k`` with ``p_k = softmax(z_k)`` (temperature 1, natural
log), ``w_k = 1 - H_k / sum_j H_j``, and
``loss = sum_{k,b} w_kb * KL_T(s_b || t_kb) / (B * K)`` with the per-sample KL
summed over classes and times T^2.  The weights sum to K - 1 over teachers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from camkd.errors import CamkdError
from camkd.methods.base import LogitMethod, TeacherOut, register_method
from camkd.methods.functional import kl_per_sample
from camkd.store.topk import teacher_entropies


def ebkd_weights(teacher_logits: Tensor, log_entropy: Tensor | None = None) -> Tensor:
    """[B, K] float32 weights ``1 - H_k / sum_j H_j`` from the teachers' entropies at T = 1.

    The weights of a sample sum to K - 1.  K == 1: weight 1 (the reference routes a
    single teacher to AVERAGE_LOSS, i.e. plain KD).  If every teacher's entropy on a
    sample is exactly 0 even in float64 (margins beyond ~745, or a single class),
    the reference divides 0 by 0; we take the ratio as 1/K (each weight (K-1)/K),
    the limit of K equally confident teachers, so the sum stays K - 1.

    ``log_entropy`` [B, K] (a top-k store's exact log-entropies): the ratio is their softmax over
    the teachers, the same ratio without the underflow (all -inf: 1/K as above).
    """
    K = teacher_logits.shape[1]
    if K == 1:
        return teacher_logits.new_ones(teacher_logits.shape[:2], dtype=torch.float32)
    if log_entropy is not None:
        logh = log_entropy.double()
        ratio = torch.softmax(logh.nan_to_num(neginf=-1e300), dim=1)  # all -inf: equal logs, so 1/K
        return (1.0 - ratio).float()
    ent = teacher_entropies(teacher_logits)
    total = ent.sum(1, keepdim=True)
    ratio = torch.where(total > 0, ent / total, 1.0 / K)  # no clamp: a subnormal total divides fine
    return (1.0 - ratio).float()


def ebkd_loss(student_logits: Tensor, teacher_logits: Tensor, *, T: float, kept: Tensor | None = None,
              log_entropy: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(``sum_{k,b} w_kb KL_T,kb / (B K)``, weights [B, K]); top-k: the stored log-entropies, binned KL."""
    if kept is not None and log_entropy is None:
        raise CamkdError("ebkd: top-k teacher logits need the stored entropies (log_entropy)")
    w = ebkd_weights(teacher_logits, log_entropy)
    kl = kl_per_sample(student_logits, teacher_logits, T=T, kept=kept)  # [B, K]
    B, K = kl.shape
    return (w * kl).sum() / (B * K), w


@register_method("ebkd")
class EBKD(LogitMethod):
    """gamma * CE + alpha * entropy-weighted KD."""

    def kd_term(self, student_logits: Tensor, teachers: TeacherOut, labels: Tensor) -> tuple[Tensor, Tensor]:
        kd, w = ebkd_loss(student_logits, teachers.logits, T=self.kd_T, kept=teachers.kept, log_entropy=teachers.log_entropy)
        mean = w.mean(0)
        return kd, mean / mean.sum()  # shares summing to 1 (the raw weights sum to K - 1)
