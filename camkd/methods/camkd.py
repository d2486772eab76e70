"""``camkd``: Confidence-Aware Multi-Teacher KD (Zhang, Chen, Wang, ICASSP 2022).

Reference: CA-MKD ``helper/loops.py`` (``ensemble_method == "CAMKD"``,
``distill == "inter"``), ``distiller_zoo/CAMKD.py``, ``distiller_zoo/KD.py``
(``DistillKL(is_ca=True)``) and ``models/util.py`` (``CalWeight``, ``Embed``).

Logit level (paper Eq. 2-3):
    w_kb = (1 - softmax_k(CE(z_kb, y_b))) / (K - 1)
    loss_kd = sum_{k,b} w_kb KL_T(s_b || t_kb) / (B K)      (KL summed over classes, x T^2)

Intermediate level (paper Eq. 4-6): the student's last feature map ``feats[-2]`` is
resized to teacher k's penultimate map (adaptive average pooling when it is at
least as large in both dims, else bilinear; written with ops whose CUDA backward is
deterministic, :mod:`camkd.methods.resize`), mapped by ``Embed_k`` (1x1 conv with
bias, BN, ReLU) to the teacher's channels, and sent through teacher k's frozen
classifier head; the CE of that output against the label gives ``v_kb`` as above,
*not* detached (gradients reach the embeds through the weights too), and

    loss_inter = sum_{k,b} v_kb MSE_b(Embed_k(f_s), f_t,k) / (B K)  (MSE_b: mean over c, h, w)

Total ``gamma CE + alpha loss_kd + beta loss_inter``; the beta term is 0 in epoch 1
(the reference's loop).  K == 1: weights 1 (the reference divides by K - 1 = 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camkd.errors import CamkdError
from camkd.methods.base import (
    Diagnostics,
    LogitMethod,
    MethodConfig,
    StudentOut,
    TeacherOut,
    per_teacher_modules,
    register_method,
)
from camkd.methods.functional import confidence_weights, kl_per_sample
from camkd.methods.resize import Resize


def camkd_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, T: float,
                  kept: Tensor | None = None, ce: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(``sum_{k,b} w_kb KL_T,kb / (B K)``, weights [B, K]); the weights use the teachers' CE.

    From a top-k store: ``ce`` [B, K] the stored exact CE, ``kept`` the kept classes (KL with a tail bin).
    """
    t = teacher_logits.float()
    B, K, C = t.shape
    if ce is None:
        if kept is not None:
            raise CamkdError("camkd: top-k teacher logits need the stored cross-entropies (ce)")
        ce = F.cross_entropy(t.reshape(B * K, C), labels.repeat_interleave(K), reduction="none").view(B, K)
    w = confidence_weights(ce.float())
    kl = kl_per_sample(student_logits, t, T=T, kept=kept)  # [B, K]
    return (w * kl).sum() / (B * K), w


def camkd_inter_loss(
    embedded: list[Tensor], teacher_feats: list[Tensor], head_logits: list[Tensor], labels: Tensor
) -> tuple[Tensor, Tensor]:
    """(``sum_{k,b} v_kb MSE_b / (B K)``, weights [B, K]).

    ``v`` comes from the CE of ``head_logits`` and is not detached.

    ``embedded[k]`` is Embed_k of the resized student map, ``teacher_feats[k]`` the
    teacher's penultimate map and ``head_logits[k]`` = teacher k's head applied to
    ``embedded[k]``.
    """
    ce = torch.stack([F.cross_entropy(h.float(), labels, reduction="none") for h in head_logits], 1)
    v = confidence_weights(ce)  # [B, K]
    # per-sample mean of squares [B, K]; sum / n instead of mean(1): the same values, a cheaper backward
    sq = [F.mse_loss(e.float(), f.float(), reduction="none") for e, f in zip(embedded, teacher_feats, strict=True)]
    mse = torch.stack([d.flatten(1).sum(1) / d[0].numel() for d in sq], 1)
    B, K = mse.shape
    return (v * mse).sum() / (B * K), v


class Embed(nn.Module):
    """CA-MKD ``Embed`` (``convs=False``): 1x1 conv (with bias), BatchNorm, ReLU, applied to the student map resized
    from ``src`` to the teacher's ``size`` (``CalWeight``'s rule: average-pooled down when at least as large in both
    dims, identity when equal, else bilinear), all in :meth:`forward`, so ``--compile`` compiles the whole path.

    The resize is :class:`~camkd.methods.resize.Resize` (a deterministic CUDA backward). A bilinear resize runs after
    the conv, at the student's smaller size: the 1x1 conv and the resize are both linear and act on different axes
    (channels, positions), so they commute (the bias too: each output's bilinear weights sum to 1); equal to the
    direct order up to float32 round-off, at 1/(upsampling factor) of the conv's cost. Pooling runs before the conv.
    """

    def __init__(self, dim_in: int, dim_out: int, src: tuple[int, int], size: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size=1)
        self.bn = nn.BatchNorm2d(dim_out)
        self.relu = nn.ReLU(inplace=True)
        down = src[0] >= size[0] and src[1] >= size[1]
        self.upsampled = not down
        self.resize = Resize(src, size, "pool" if down else "bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: the student map [B, C_s, *src] -> [B, C_t, *size]."""
        if self.upsampled:
            return self.relu(self.bn(self.resize(self.conv(x))))
        return self.relu(self.bn(self.conv(self.resize(x))))


@register_method("camkd")
class CAMKD(LogitMethod):
    """gamma * CE + alpha * confidence-weighted KD + beta * confidence-weighted feature MSE (from epoch 2).

    Losses ``ce``, ``kd``, ``inter``; diagnostics ``teacher_weights`` (the logit-level
    weights' batch mean) and, from epoch 2, ``inter_weights`` (the feature level's).
    One trainable ``Embed`` per teacher (``embeds``); the teachers' heads come in
    with their features (:class:`TeacherOut`).
    """

    default_beta = 50.0
    feature_loss = "inter"

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.embeds = per_teacher_modules(
            cfg, lambda s, t: Embed(s[0], t[0], (s[1], s[2]), (t[1], t[2])), index=-2, layer="penultimate",
            method="camkd", enabled=self.beta > 0,
        )

    @classmethod
    def features_needed(cls, *, beta: float, hint_layer: int) -> tuple[str, ...]:
        return ("penultimate",) if beta > 0 else ()

    def kd_term(self, student_logits: Tensor, teachers: TeacherOut, labels: Tensor) -> tuple[Tensor, Tensor]:
        kd, w = camkd_kd_loss(student_logits, teachers.logits, labels, T=self.kd_T, kept=teachers.kept, ce=teachers.ce)
        return kd, w.detach().mean(0)

    def feature_term(self, student: StudentOut, teachers: TeacherOut, labels: Tensor) -> tuple[Tensor, Diagnostics]:
        f_t = teachers.features.get("penultimate")
        if f_t is None or len(f_t) != self.num_teachers or len(teachers.heads) != self.num_teachers:
            raise CamkdError("camkd needs the teachers' 'penultimate' features and heads for all teachers")
        f_s = student.feats[-2]
        embedded = [embed(f_s) for embed in self.embeds]  # each resizes f_s to its teacher's size (Embed.forward)
        head_logits = [head(e) for head, e in zip(teachers.heads, embedded, strict=True)]
        inter, v = camkd_inter_loss(embedded, f_t, head_logits, labels)
        return inter, {"inter_weights": v.detach().mean(0)}
