"""Shared pure loss pieces (RepDistiller ``DistillKL`` and cross-entropy), over tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_per_sample(student_logits: Tensor, teacher_logits: Tensor, *, T: float) -> Tensor:
    """``KL(softmax(t/T) || softmax(s/T))`` summed over classes, times ``T**2``; no batch reduction.

    This is RepDistiller/CA-MKD ``DistillKL(T)(s, t, is_ca=True)``.  ``student_logits``
    [B, C] broadcasts against ``teacher_logits`` [B, K, C] (result [B, K]) or [B, C]
    (result [B]).  Computed in float32 from log-probabilities on both sides, so a
    teacher probability that underflows to 0 contributes exactly 0 (no 0*log 0 NaN).
    """
    s = student_logits.float()
    t = teacher_logits.float()
    if t.dim() == 3:
        s = s.unsqueeze(1)
    log_ps = F.log_softmax(s / T, dim=-1)
    log_pt = F.log_softmax(t / T, dim=-1)
    kl = F.kl_div(log_ps.expand_as(log_pt), log_pt, reduction="none", log_target=True)
    return kl.sum(-1) * (T * T)


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, *, T: float) -> Tensor:
    """RepDistiller ``DistillKL(T)``: per-sample KL (classes summed, times T^2) averaged over the batch."""
    return kl_per_sample(student_logits, teacher_logits, T=T).mean(0)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy in float32 (``nn.CrossEntropyLoss()``)."""
    return F.cross_entropy(logits.float(), labels)


def confidence_weights(ce: Tensor) -> Tensor:
    """CA-MKD Eq. (2)/(5): ``w_k = (1 - softmax_k(CE_k)) / (K - 1)`` over the last dim.

    ``ce`` is [B, K] (per-sample cross-entropy of each teacher, or of the student's
    embedded feature through teacher k's head).  For K == 1 the reference divides
    0 by 0; here the single teacher gets weight 1, which makes CA-MKD with one
    teacher equal to the reference's single-teacher path (plain KD, AVERAGE_LOSS).
    """
    K = ce.shape[-1]
    if K == 1:
        return torch.ones_like(ce)
    return (1.0 - torch.softmax(ce, dim=-1)) / (K - 1)
