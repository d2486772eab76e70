"""Shared pure loss pieces (RepDistiller ``DistillKL`` and cross-entropy), over tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_per_sample(student_logits: Tensor, teacher_logits: Tensor, *, T: float, kept: Tensor | None = None) -> Tensor:
    """``KL(softmax(t/T) || softmax(s/T))`` summed over classes, times ``T**2``; no batch reduction.

    This is RepDistiller/CA-MKD ``DistillKL(T)(s, t, is_ca=True)``.  ``student_logits``
    [B, C] broadcasts against ``teacher_logits`` [B, K, C] (result [B, K]) or [B, C]
    (result [B]).  Computed in float32 from log-probabilities on both sides, so a
    teacher probability that underflows to 0 contributes exactly 0 (no 0*log 0 NaN).

    ``kept`` (bool, shaped like ``teacher_logits``; from a top-k store): the KL over the kept
    classes plus one tail bin holding the rest of each side's mass (see :func:`binned_kl`).
    """
    s = student_logits.float()
    t = teacher_logits.float()
    if t.dim() == 3:
        s = s.unsqueeze(1)
    log_ps = F.log_softmax(s / T, dim=-1)
    log_pt = F.log_softmax(t / T, dim=-1)
    if kept is not None:
        return binned_kl(log_ps.expand_as(log_pt), log_pt, kept) * (T * T)
    kl = F.kl_div(log_ps.expand_as(log_pt), log_pt, reduction="none", log_target=True)
    return kl.sum(-1) * (T * T)


def binned_kl(log_ps: Tensor, log_pt: Tensor, kept: Tensor) -> Tensor:
    """``KL(q || p)`` over the classes where ``kept`` is true plus one tail bin (all the other classes).

    ``log_pt`` / ``log_ps``: normalized log-probabilities [..., C] of the teacher (q) and the student (p).
    The tail bin's masses are ``Q = sum_{not kept} q`` and ``P = sum_{not kept} p``; its term
    ``Q log(Q / P)`` is 0 when Q is 0.  The result is at most the full KL (log-sum inequality),
    and equal to it when the tail holds one class; a row that keeps every class has no tail term.
    """
    kl_kept = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).masked_fill(~kept, 0.0).sum(-1)
    has_tail, mask = _tail_mask(kept)
    log_q_tail = log_pt.masked_fill(mask, float("-inf")).logsumexp(-1)
    log_p_tail = log_ps.masked_fill(mask, float("-inf")).logsumexp(-1)
    return kl_kept + F.kl_div(log_p_tail, log_q_tail, reduction="none", log_target=True) * has_tail


def _tail_mask(kept: Tensor) -> tuple[Tensor, Tensor]:
    """(rows with a tail class [...], the mask of kept classes in those rows only): a row that keeps every class
    (e.g. ``kd``'s union over teachers) masks nothing, so no logsumexp over only -inf (NaN gradients)."""
    has_tail = (~kept).any(-1)
    return has_tail, kept & has_tail.unsqueeze(-1)


def effective_teacher_probs(student_logits: Tensor, teacher_logits: Tensor, *, T: float, kept: Tensor | None = None) -> Tensor:
    """The teacher distribution q' [B, K, C] with ``d (T^2 KL_T) / d s = T (softmax(s / T) - q')`` per class.

    Dense: ``softmax(t / T)``.  Binned (``kept``, see :func:`binned_kl`): q on the kept classes, and on
    each other class c the tail mass shared as the student shares its own: ``Q p_c / P``.
    """
    if kept is None:
        return torch.softmax(teacher_logits.float() / T, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / T, dim=-1)
    log_ps = F.log_softmax(student_logits.float().unsqueeze(1) / T, dim=-1).expand_as(log_pt)
    _, mask = _tail_mask(kept)
    log_q_tail = log_pt.masked_fill(mask, float("-inf")).logsumexp(-1, keepdim=True)
    log_p_tail = log_ps.masked_fill(mask, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.where(kept, log_pt, log_q_tail + log_ps - log_p_tail).exp()


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, *, T: float, kept: Tensor | None = None) -> Tensor:
    """RepDistiller ``DistillKL(T)``: per-sample KL (classes summed, times T^2) averaged over the batch."""
    return kl_per_sample(student_logits, teacher_logits, T=T, kept=kept).mean(0)


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
