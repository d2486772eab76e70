"""``fitnet`` (FitNet-MKD): AVER-MKD plus hint regression to every teacher.

Reference: CA-MKD ``helper/loops.py`` (``distill == "hint"``, ``AVERAGE_LOSS``),
``models/util.py`` ``ConvReg`` and RepDistiller ``distiller_zoo/FitNet.py``
``HintLoss`` (``nn.MSELoss()``, the mean over all B*c*h*w elements).  Per teacher k a
trainable ``ConvReg`` maps student ``feats[L]`` to teacher k's ``feats[L]``:

    loss_hint = (1/K) sum_k MSE(reg_k(f_s), f_t,k)

The reference wraps the per-teacher losses in ``torch.tensor(list)`` before the mean,
which detaches them: its hint term carries no gradient, so neither the regressors
nor the student learn from it.  Ours keeps the graph.  As the reference's loop does
for every ``-b`` term, the hint term is left out in epoch 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camkd.errors import CamkdError
from camkd.methods.avg import avg_mkd_loss
from camkd.methods.base import (
    Diagnostics,
    LogitMethod,
    MethodConfig,
    Shape,
    StudentOut,
    TeacherOut,
    per_teacher_modules,
    register_method,
)
from camkd.methods.resize import Resize


def fitnet_hint_loss(regressed: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
    """``(1/K) sum_k mean((r_k - f_t,k)^2)`` over all elements of each pair (HintLoss)."""
    terms = [F.mse_loss(r.float(), t.float()) for r, t in zip(regressed, teacher_feats, strict=True)]
    return torch.stack(terms).mean()


class ConvReg(nn.Module):
    """FitNet convolutional regressor (RepDistiller/CA-MKD ``ConvReg``): conv, BN, ReLU.

    The conv depends on the heights, as in the reference: ``s_H == 2 t_H``: 3x3
    stride-2 conv; ``2 s_H == t_H``: 4x4 stride-2 transposed conv; ``s_H >= t_H``:
    valid conv of kernel ``(1 + s_H - t_H, 1 + s_W - t_W)``; otherwise (student map
    smaller): bilinear resize to the teacher's size, then a 3x3 conv (CA-MKD does
    this for ``4 s_H == t_H``, ``F.interpolate(mode="bilinear", align_corners=False)``; any
    other ratio made the reference fail at the MSE).  The resize is
    :class:`~camkd.methods.resize.Resize`: the same map, with a deterministic CUDA backward.
    A pair whose output would not be the teacher's size raises :class:`CamkdError`.
    """

    def __init__(self, s_shape: Shape, t_shape: Shape) -> None:
        super().__init__()
        s_C, s_H, s_W = s_shape
        t_C, t_H, t_W = t_shape
        self.resize: Resize | None = None
        if s_H == 2 * t_H:
            self.conv: nn.Module = nn.Conv2d(s_C, t_C, kernel_size=3, stride=2, padding=1)
            out = ((s_H - 1) // 2 + 1, (s_W - 1) // 2 + 1)
        elif s_H * 2 == t_H:
            self.conv = nn.ConvTranspose2d(s_C, t_C, kernel_size=4, stride=2, padding=1)
            out = (2 * s_H, 2 * s_W)
        elif s_H >= t_H:
            if s_W < t_W:
                out = (t_H, s_W - t_W)  # impossible: reported below
                self.conv = nn.Identity()
            else:
                self.conv = nn.Conv2d(s_C, t_C, kernel_size=(1 + s_H - t_H, 1 + s_W - t_W))
                out = (t_H, t_W)
        else:
            self.resize = Resize((s_H, s_W), (t_H, t_W), "bilinear", align_corners=False)  # F.interpolate's settings
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=3, stride=1, padding=1)
            out = (t_H, t_W)
        if out != (t_H, t_W):
            raise CamkdError(
                f"cannot regress a student feature map {tuple(s_shape)} onto a teacher's {tuple(t_shape)}"
                " (FitNet ConvReg needs matching height/width relations)"
            )
        self.bn = nn.BatchNorm2d(t_C)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.resize is not None:
            x = self.resize(x)
        return self.relu(self.bn(self.conv(x)))


@register_method("fitnet")
class FitNetMKD(LogitMethod):
    """gamma CE + alpha AVER-MKD + beta mean_k HintLoss(reg_k(f_s[L]), f_t,k[L]); beta term from epoch 2."""

    default_beta = 100.0
    feature_loss = "hint"

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.hint_layer = cfg.loss.hint_layer
        self.layer = f"hint{cfg.loss.hint_layer}"
        self.regressors = per_teacher_modules(
            cfg, ConvReg, index=cfg.loss.hint_layer, layer=self.layer, method="fitnet", enabled=self.beta > 0
        )

    @classmethod
    def features_needed(cls, *, beta: float, hint_layer: int) -> tuple[str, ...]:
        return (f"hint{hint_layer}",) if beta > 0 else ()

    @classmethod
    def loss_options(cls) -> tuple[str, ...]:
        return super().loss_options() + ("hint_layer",)

    def kd_term(self, student_logits: Tensor, teachers: TeacherOut, labels: Tensor) -> tuple[Tensor, Tensor]:
        return avg_mkd_loss(student_logits, teachers.logits, T=self.kd_T, kept=teachers.kept), self.uniform_weights(student_logits)

    def feature_term(self, student: StudentOut, teachers: TeacherOut, labels: Tensor) -> tuple[Tensor, Diagnostics]:
        f_t = teachers.features.get(self.layer)
        if f_t is None or len(f_t) != self.num_teachers:
            raise CamkdError(f"fitnet needs teacher features {self.layer!r} for all teachers")
        f_s = student.feats[self.hint_layer]
        return fitnet_hint_loss([reg(f_s) for reg in self.regressors], f_t), {}
