"""``aekd``: Adaptive Ensemble KD (Du et al., NeurIPS 2020) as run by the CA-MKD reference.

Reference: CA-MKD ``helper/loops.py`` (``ensemble_method == "AEKD"``) and
``helper/optimization.py`` (``find_optimal_svm``).  Per batch:

* ``g_k`` = gradient of ``DistillKL(s, t_k)`` (batchmean, x T^2) w.r.t. the student
  logits, averaged over the batch -> one C-vector per teacher.  Analytically
  ``dKL_k/ds_b = (T / B) (softmax(s_b/T) - softmax(t_kb/T))``; the reference gets
  it with backward hooks.  The common factor T/B does not change the weights.
* The reference fits sklearn's ``OneClassSVM(kernel="precomputed", nu)`` on the Gram
  matrix ``G = [g_j . g_k]`` with ``nu = 1/(C K)`` (clamped to [1/K, 1]) and sets
  ``w = alpha_svm / (K nu)``.  That is the AEKD dual:

      minimise  w^T G w   subject to  sum_k w_k = 1,  0 <= w_k <= u,  u = 1/(K nu) = clamp(C, 1/K, 1)

* ``loss = sum_k w_k DistillKL(s, t_k)`` with the weights detached (a numpy array in
  the reference).

We solve that QP exactly (to float64 round-off) instead of with libsvm (tolerance
1e-6): every face of the box-simplex is tried by solving its KKT linear system, and
the feasible candidate with the least objective is the minimiser (see
:func:`capped_simplex_qp`).  G is divided by trace(G)/K (the minimiser is scale
free) and a ridge of 1e-9 * I makes it positive definite, so the answer is
unique: where ``w^T G w`` has many minimisers (e.g. identical teachers) we return
the one of least norm in the limit (uniform for identical teachers), where libsvm
returns whichever its initial point gives.
If every g_k is zero (G = 0) the weights are uniform.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch
from torch import Tensor

from camkd.errors import CamkdError
from camkd.methods.base import (
    Diagnostics,
    Losses,
    Method,
    MethodConfig,
    StudentOut,
    TeacherOut,
    register_method,
)
from camkd.methods.functional import cross_entropy, distill_kl

MAX_TEACHERS = 8  # the exact solver enumerates 3^K faces (6561 tiny systems at K = 8)


@functools.lru_cache(maxsize=None)
def _faces(K: int) -> tuple[np.ndarray, np.ndarray]:
    """All assignments of each coordinate to {lower bound, upper bound, free}: (free, upper) masks."""
    pats = np.array(list(itertools.product((0, 1, 2), repeat=K)), dtype=np.int64).reshape(-1, K)
    return pats == 2, pats == 1


def capped_simplex_qp(G: np.ndarray, upper: float) -> np.ndarray:
    """Exact minimiser of ``w^T G w`` over ``{sum w = 1, 0 <= w <= upper}`` (float64).

    ``G`` [K, K] symmetric positive definite; ``upper * K >= 1`` so the set is not
    empty.  The minimiser lies in the relative interior of some face (each
    coordinate at 0, at ``upper`` or free); on that face it solves
    ``G_F w + lambda 1 = 0`` (free rows), ``w_i = bound`` (fixed rows), ``sum w = 1``.
    All faces are solved in one batched call; of the candidates inside the box the
    one with the least objective is returned (a convex problem: no sign checks of
    the multipliers are needed once all faces are compared).  numpy, not torch:
    torch's batched CPU solve costs milliseconds for these 4x4 systems.
    """
    G = np.asarray(G, dtype=np.float64)
    K = G.shape[0]
    if K == 1:
        return np.ones(1)
    free, up = _faces(K)
    P = free.shape[0]
    A = np.zeros((P, K + 1, K + 1))
    A[:, :K, :K] = np.where(free[:, :, None], G[None], np.eye(K)[None])
    A[:, :K, K] = free
    A[:, K, :K] = 1.0
    b = np.zeros((P, K + 1))
    b[:, :K] = up * upper
    b[:, K] = 1.0
    has_free = free.any(1)
    sol = np.zeros((P, K + 1))
    # faces with a free coordinate: the KKT matrix is nonsingular for positive definite G
    sol[has_free] = np.linalg.solve(A[has_free], b[has_free][..., None])[..., 0]
    # vertices (no free coordinate): w is fixed; the sum constraint is checked below
    sol[~has_free, :K] = b[~has_free, :K]
    w = sol[:, :K]
    tol = 1e-7  # the solves are accurate far below this; it only absorbs round-off at the bounds
    ok = (w >= -tol).all(1) & (w <= upper + tol).all(1) & (np.abs(w.sum(1) - 1.0) <= tol)
    if not ok.any():  # only with non-finite input (NaN logits): fall back to uniform
        return np.full(K, 1.0 / K)
    obj = np.einsum("pi,ij,pj->p", w, G, w)
    best = np.clip(w[int(np.argmin(np.where(ok, obj, np.inf)))], 0.0, upper)
    return best / best.sum()


def aekd_weights(student_logits: Tensor, teacher_logits: Tensor, *, T: float, C: float) -> Tensor:
    """Detached [K] teacher weights (nonnegative, summing to 1) for one batch; see the module docstring."""
    with torch.no_grad():
        s = torch.softmax(student_logits.float() / T, dim=-1).unsqueeze(1)  # [B, 1, C]
        t = torch.softmax(teacher_logits.float() / T, dim=-1)  # [B, K, C]
        g = (s - t).mean(0).cpu().double()  # [K, C]: batch-mean gradient up to the factor T/B
        G = (g @ g.T).numpy()
    K = G.shape[0]
    scale = float(np.trace(G)) / K
    # scale-free, plus a tiny ridge: positive definite, least-norm minimiser in the limit
    G = G / scale + 1e-9 * np.eye(K) if scale > 1e-150 else np.eye(K)
    upper = min(max(C, 1.0 / K), 1.0)  # u = 1/(K nu), nu = 1/(C K) clamped to [1/K, 1]
    w = capped_simplex_qp(G, upper)
    return torch.as_tensor(w, dtype=torch.float32).to(student_logits.device)


def aekd_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, T: float, C: float
) -> tuple[Tensor, Tensor]:
    """(``sum_k w_k DistillKL_T(s, t_k)``, weights [K]) with the weights detached."""
    w = aekd_weights(student_logits, teacher_logits, T=T, C=C)
    per_teacher = distill_kl(student_logits, teacher_logits, T=T)  # [K]
    return (w * per_teacher).sum(), w


@register_method("aekd")
class AEKD(Method):
    """gamma * CE + alpha * AEKD-weighted KD (weights from the nu-SVM in gradient space)."""

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        if cfg.num_teachers > MAX_TEACHERS:
            raise CamkdError(
                f"aekd supports at most {MAX_TEACHERS} teachers (exact QP), got {cfg.num_teachers}"
            )
        self.C = float(cfg.aekd_C)

    def forward(
        self, student: StudentOut, teachers: TeacherOut, labels: Tensor, *, epoch: int
    ) -> tuple[Losses, Diagnostics]:
        self.check_inputs(student, teachers, labels)
        kd, w = aekd_loss(student.logits, teachers.logits, T=self.kd_T, C=self.C)
        losses = {"ce": self.gamma * cross_entropy(student.logits, labels), "kd": self.alpha * kd}
        return losses, {"teacher_weights": w.tolist()}
