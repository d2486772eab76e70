"""AEKD's exact QP in torch against the former numpy solver, and its weights in extreme regimes.

``np_capped_simplex_qp`` / ``np_aekd_weights`` are the numpy implementation camkd used
before the solve moved to torch (camkd 6a257eb, ``camkd/methods/aekd.py``), kept here
only as the oracle: the torch solve must give the same weights to float64 round-off.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from camkd.methods import StudentOut, TeacherOut, create_method
from camkd.methods.aekd import aekd_weights, capped_simplex_qp

T = 4.0


def np_capped_simplex_qp(G: np.ndarray, upper: float) -> np.ndarray:
    G = np.asarray(G, dtype=np.float64)
    K = G.shape[0]
    if K == 1:
        return np.ones(1)
    pats = np.array(list(itertools.product((0, 1, 2), repeat=K)), dtype=np.int64).reshape(-1, K)
    free, up = pats == 2, pats == 1
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
    sol[has_free] = np.linalg.solve(A[has_free], b[has_free][..., None])[..., 0]
    sol[~has_free, :K] = b[~has_free, :K]
    w = sol[:, :K]
    tol = 1e-7
    ok = (w >= -tol).all(1) & (w <= upper + tol).all(1) & (np.abs(w.sum(1) - 1.0) <= tol)
    if not ok.any():
        return np.full(K, 1.0 / K)
    obj = np.einsum("pi,ij,pj->p", w, G, w)
    best = np.clip(w[int(np.argmin(np.where(ok, obj, np.inf)))], 0.0, upper)
    return best / best.sum()


def np_aekd_weights(s: torch.Tensor, t: torch.Tensor, *, T: float, C: float) -> np.ndarray:
    ps = torch.softmax(s.float() / T, dim=-1).unsqueeze(1)
    pt = torch.softmax(t.float() / T, dim=-1)
    g = (ps - pt).mean(0).double()
    G = (g @ g.T).numpy()
    K = G.shape[0]
    scale = float(np.trace(G)) / K
    G = G / scale + 1e-9 * np.eye(K) if scale > 1e-150 else np.eye(K)
    return np_capped_simplex_qp(G, min(max(C, 1.0 / K), 1.0))


def random_spd(K: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    g = rng.normal(size=(K, rank or K + 2))
    G = g @ g.T
    return G / (np.trace(G) / K) + 1e-9 * np.eye(K)


@pytest.mark.parametrize("K", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("upper", [0.6, 0.45, 1.0])
def test_torch_qp_equals_numpy_qp(K, upper):
    rng = np.random.default_rng(10 * K + int(upper * 100))
    upper = max(upper, 1.0 / K)
    for rank in (None, 1, 2):
        for _ in range(5):
            G = random_spd(K, rng, rank)
            w = capped_simplex_qp(torch.from_numpy(G), upper)
            assert w.dtype == torch.float64
            ref = np_capped_simplex_qp(G, upper)
            # float64 round-off of two LAPACK builds, amplified by the conditioning: rank-deficient
            # gradients leave only the 1e-9 ridge (cond ~ 1e9), full rank is ~1e-16
            atol = 1e-14 * max(np.linalg.cond(G), 100.0)
            assert np.allclose(w.numpy(), ref, rtol=0, atol=atol), (w, ref)
            assert np.isclose(w.numpy() @ G @ w.numpy(), ref @ G @ ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 8])
def test_aekd_weights_equal_numpy_pipeline(K):
    rng = np.random.default_rng(K)
    for scale in (0.1, 3.0, 30.0):
        s = torch.from_numpy((rng.normal(size=(16, 10)) * 2).astype(np.float32))
        t = torch.from_numpy((rng.normal(size=(16, K, 10)) * scale).astype(np.float32))
        w = aekd_weights(s, t, T=T, C=0.6)
        assert w.dtype == torch.float32 and w.shape == (K,)
        assert np.allclose(w.double().numpy(), np_aekd_weights(s, t, T=T, C=0.6), rtol=0, atol=1e-7)


def pm(margin: float, B: int, K: int, C: int) -> torch.Tensor:
    """Near one-hot teacher logits: +margin/2 on class (b + k) % C, -margin/2 elsewhere."""
    t = torch.full((B, K, C), -margin / 2)
    for b in range(B):
        for k in range(K):
            t[b, k, (b + k) % C] = margin / 2
    return t


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("margin", [100.0, 2000.0])
def test_aekd_one_hot_teachers(K, margin):
    """Teachers one-hot even at T = 4 (margin 2000: softmax exactly one-hot in float32)."""
    B, C = 6, 5
    s = torch.from_numpy(np.random.default_rng(0).normal(size=(B, C)).astype(np.float32))
    t = pm(margin, B, K, C)
    w = aekd_weights(s, t, T=T, C=0.6)
    assert torch.isfinite(w).all() and (w >= 0).all() and abs(w.double().sum().item() - 1) < 1e-6
    assert np.allclose(w.double().numpy(), np_aekd_weights(s, t, T=T, C=0.6), rtol=0, atol=1e-7)
    method = create_method("aekd", num_classes=C, num_teachers=K, student_feat_shapes=[], teacher_feat_shapes={})
    losses, _ = method(StudentOut(logits=s), TeacherOut(logits=t), torch.zeros(B, dtype=torch.long), epoch=2)
    assert torch.isfinite(losses["kd"])


@pytest.mark.parametrize("K", [2, 3])
def test_aekd_zero_gradients_uniform(K):
    """Student equal to every teacher: G = 0, uniform weights (no 0/0)."""
    s = torch.randn(4, 6)
    w = aekd_weights(s, s.unsqueeze(1).repeat(1, K, 1), T=T, C=0.6)
    assert torch.equal(w, torch.full((K,), 1.0 / K))


def test_aekd_nan_logits_fall_back_to_uniform():
    s = torch.randn(4, 6)
    t = torch.randn(4, 3, 6)
    t[0, 1, 2] = float("nan")
    w = aekd_weights(s, t, T=T, C=0.6)
    assert torch.equal(w, torch.full((3,), 1.0 / 3))


def test_split_batch_sums_give_the_whole_batch_weights():
    """Under torchrun / micro-batches AEKD sums its gradient statistics over the slices: same weights as one batch."""
    from camkd.methods.aekd import aekd_gradient_sums, aekd_weights

    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(64, 10, generator=g), 3 * torch.randn(64, 3, 10, generator=g)
    whole = aekd_weights(s, t, T=4.0, C=0.6)
    sums = aekd_gradient_sums(s[:32], t[:32], T=4.0) + aekd_gradient_sums(s[32:], t[32:], T=4.0)
    split = aekd_weights(s[:32], t[:32], T=4.0, C=0.6, sums=sums)
    assert torch.allclose(split, whole, atol=1e-6)
    alone = aekd_weights(s[:32], t[:32], T=4.0, C=0.6)  # one slice alone gives other weights
    assert not torch.allclose(alone, whole, atol=1e-3)
