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
If every g_k is zero (G = 0) the weights are uniform.  Everything runs in torch on
the logits' device (float64), without reading anything back to the host.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from camkd.errors import CamkdError
from camkd.methods.base import LogitMethod, MethodConfig, TeacherOut, register_method
from camkd.methods.functional import distill_kl, effective_teacher_probs

MAX_TEACHERS = 8  # the exact solver enumerates 3^K faces (6561 tiny systems at K = 8)


@functools.cache
def _kkt_systems(K: int, upper: float, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The G-free parts of the KKT systems of all 3^K faces (each coordinate at 0, at ``upper`` or free).

    Returns (A0 [P, K+1, K+1], free [P, K, 1] as 0/1, b [P, K+1, 1], vertex [P, 1]), float64 on
    ``device``; face p's matrix is ``A0[p]`` plus ``G`` in its free rows.  Fixed rows read
    ``w_i = bound``, free rows ``G_i w + lambda = 0`` (their 1 in the last column), the last
    row ``sum w = 1``.  A vertex (no free coordinate) gets a 1 in the multiplier's diagonal
    slot, which makes its system nonsingular without changing ``w`` (the bounds).
    """
    pats = torch.tensor(list(itertools.product((0, 1, 2), repeat=K)), dtype=torch.int64).reshape(-1, K)
    free, up = (pats == 2).double(), (pats == 1).double()
    P = pats.shape[0]
    vertex = free.sum(1) == 0
    A0 = torch.zeros(P, K + 1, K + 1, dtype=torch.float64)
    A0[:, :K, :K] = (1.0 - free)[:, :, None] * torch.eye(K, dtype=torch.float64)
    A0[:, :K, K] = free
    A0[:, K, :K] = 1.0
    A0[:, K, K] = vertex.double()
    b = torch.cat([up * upper, torch.ones(P, 1, dtype=torch.float64)], 1).unsqueeze(-1)
    return A0.to(device), free.unsqueeze(-1).to(device), b.to(device), vertex.unsqueeze(-1).to(device)


def capped_simplex_qp(G: Tensor, upper: float) -> Tensor:
    """Exact minimiser [K] of ``w^T G w`` over ``{sum w = 1, 0 <= w <= upper}`` (float64, on G's device).

    ``G`` [K, K] symmetric positive definite; ``upper * K >= 1`` so the set is not
    empty.  The minimiser lies in the relative interior of some face (each
    coordinate at 0, at ``upper`` or free); on that face it solves
    ``G_F w + lambda 1 = 0`` (free rows), ``w_i = bound`` (fixed rows), ``sum w = 1``
    (see :func:`_kkt_systems`).  All faces are solved in one batched call; of the
    candidates inside the box the one with the least objective is returned (a
    convex problem: no sign checks of the multipliers are needed once all faces are
    compared).
    """
    K = G.shape[0]
    if K == 1:
        return G.new_ones(1)
    A0, free, b, vertex = _kkt_systems(K, float(upper), G.device)
    A = A0 + F.pad(free * G.double(), (0, 1, 0, 1))
    sol, _ = torch.linalg.solve_ex(A, b)  # solve_ex: no error check, no host sync
    w = torch.where(vertex, b[:, :K, 0], sol[:, :K, 0])
    tol = 1e-7  # the solves are accurate far below this; it only absorbs round-off at the bounds
    ok = (w >= -tol).all(1) & (w <= upper + tol).all(1) & ((w.sum(1) - 1.0).abs() <= tol)
    obj = torch.einsum("pi,ij,pj->p", w, G, w)
    pick = torch.argmin(torch.where(ok, obj, torch.inf)).view(1)  # index_select: no host read of the index
    best = w.index_select(0, pick)[0].clamp(0.0, upper)
    # no candidate inside the box only with non-finite input (NaN logits): uniform
    return torch.where(ok.any(), best / best.sum(), torch.full_like(best, 1.0 / K))


def aekd_gradient_sums(student_logits: Tensor, teacher_logits: Tensor, *, T: float, kept: Tensor | None = None) -> Tensor:
    """[K, C + 1] float64: per teacher, the sum over the samples of softmax(s/T) - softmax(t_k/T), and the count.

    Summed over every slice of a global batch (micro-batches, ranks), it gives that batch's mean gradients.
    """
    with torch.no_grad():
        s = torch.softmax(student_logits.float() / T, dim=-1).unsqueeze(1)  # [B, 1, C]
        t = effective_teacher_probs(student_logits, teacher_logits, T=T, kept=kept)  # [B, K, C]
        d = (s - t).double().sum(0)  # [K, C]
        return torch.cat([d, d.new_full((d.shape[0], 1), float(student_logits.shape[0]))], dim=1)


def aekd_weights(student_logits: Tensor, teacher_logits: Tensor, *, T: float, C: float, sums: Tensor | None = None,
                 kept: Tensor | None = None) -> Tensor:
    """Detached float32 [K] teacher weights (nonnegative, summing to 1) for one batch; see the module docstring.

    ``sums``: :func:`aekd_gradient_sums` over the whole global batch when this is one slice of it.
    ``kept`` (top-k): the gradients of the binned KL (:func:`effective_teacher_probs`).
    """
    with torch.no_grad():
        if sums is None:
            s = torch.softmax(student_logits.float() / T, dim=-1).unsqueeze(1)  # [B, 1, C]
            t = effective_teacher_probs(student_logits, teacher_logits, T=T, kept=kept)  # [B, K, C]
            g = (s - t).mean(0).double()  # [K, C]: batch-mean gradient up to the factor T/B
        else:
            g = sums[:, :-1] / sums[:, -1:]
        G = g @ g.T
        K = G.shape[0]
        scale = G.diagonal().sum() / K
        eye = torch.eye(K, dtype=G.dtype, device=G.device)
        # scale-free, plus a tiny ridge: positive definite, least-norm minimiser in the limit
        G = torch.where(scale > 1e-150, G / scale + 1e-9 * eye, eye)
        upper = min(max(C, 1.0 / K), 1.0)  # u = 1/(K nu), nu = 1/(C K) clamped to [1/K, 1]
        return capped_simplex_qp(G, upper).float()


def aekd_loss(student_logits: Tensor, teacher_logits: Tensor, *, T: float, C: float,
              sums: Tensor | None = None, kept: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(``sum_k w_k DistillKL_T(s, t_k)``, weights [K]) with the weights detached."""
    w = aekd_weights(student_logits, teacher_logits, T=T, C=C, sums=sums, kept=kept)
    per_teacher = distill_kl(student_logits, teacher_logits, T=T, kept=kept)  # [K]
    return (w * per_teacher).sum(), w


@register_method("aekd")
class AEKD(LogitMethod):
    """gamma * CE + alpha * AEKD-weighted KD (weights from the nu-SVM in gradient space)."""

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        if cfg.num_teachers > MAX_TEACHERS:
            raise CamkdError(f"aekd supports at most {MAX_TEACHERS} teachers (exact QP), got {cfg.num_teachers}")
        self.C = float(cfg.loss.aekd_C)

    @classmethod
    def loss_options(cls) -> tuple[str, ...]:
        return super().loss_options() + ("aekd_C",)

    def batch_stats(self, student_logits: Tensor, teachers: TeacherOut) -> Tensor:
        return aekd_gradient_sums(student_logits, teachers.logits, T=self.kd_T, kept=teachers.kept)

    def kd_term(self, student_logits: Tensor, teachers: TeacherOut, labels: Tensor,
                stats: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return aekd_loss(student_logits, teachers.logits, T=self.kd_T, C=self.C, sums=stats, kept=teachers.kept)
