"""Teacher weights in extreme regimes: near one-hot teachers, float32 underflow, K = 1.

The oracles here are independent of camkd's formulas: entropies and softmaxes are
computed with Python's ``decimal`` at 60 significant digits (no underflow: Decimal's
exponent range is unbounded for these sizes), from the logits' exact float32 values.
"""

from __future__ import annotations

from decimal import Decimal, localcontext

import numpy as np
import pytest
import torch

from camkd.methods import StudentOut, TeacherOut, create_method
from camkd.methods.ebkd import ebkd_weights

T = 4.0


def dec_entropy(z) -> Decimal:
    """Entropy of softmax(z) at T = 1, natural log, at 60 digits."""
    with localcontext() as ctx:
        ctx.prec = 60
        zs = [Decimal(float(v)) for v in z]
        m = max(zs)
        e = [(v - m).exp() for v in zs]
        total = sum(e)
        return -sum((x / total) * (x / total).ln() for x in e if x != 0)


def dec_ebkd_weights(t: np.ndarray) -> np.ndarray:
    """[B, K] ``1 - H_k / sum_j H_j`` at 60 digits (K = 1: 1; all H = 0: (K-1)/K)."""
    B, K, _ = t.shape
    w = np.ones((B, K))
    if K == 1:
        return w
    with localcontext() as ctx:
        ctx.prec = 60
        for b in range(B):
            H = [dec_entropy(t[b, k]) for k in range(K)]
            total = sum(H)
            for k in range(K):
                w[b, k] = float(1 - H[k] / total) if total > 0 else (K - 1) / K
    return w


def one_hot_like(margins: list[list[float]], C: int = 5) -> np.ndarray:
    """[B, K, C] logits: teacher k of sample b puts +m/2 on class (b + k) % C and -m/2 elsewhere."""
    B, K = len(margins), len(margins[0])
    t = np.empty((B, K, C), dtype=np.float32)
    for b in range(B):
        for k in range(K):
            t[b, k] = -margins[b][k] / 2
            t[b, k, (b + k) % C] = margins[b][k] / 2
    return t


EXTREME = {
    "pm50": [[100.0, 100.0, 100.0], [100.0, 90.0, 80.0]],  # one-hot-like logits at +-50 (and +-45, +-40)
    "near_tiny": [[84.0, 86.0, 88.0], [80.0, 85.0, 90.0], [87.0, 87.5, 88.5]],  # sum of H ~ float32 tiny
    "normal_large": [[30.0, 40.0, 50.0], [20.0, 35.0, 60.0]],  # float32 loses the top class's term
    "mixed": [[100.0, 2.0, 10.0], [120.0, 110.0, 1.0]],
}


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("case", sorted(EXTREME))
def test_ebkd_weights_extreme_match_high_precision(case, K):
    t = one_hot_like([row[:K] for row in EXTREME[case]])
    w = ebkd_weights(torch.from_numpy(t))
    assert w.dtype == torch.float32 and w.shape == t.shape[:2]
    expected = dec_ebkd_weights(t)
    assert np.allclose(w.numpy(), expected, rtol=0, atol=2e-7), (w, expected)
    assert np.allclose(w.double().sum(1).numpy(), max(K - 1, 1), rtol=0, atol=4e-7)


@pytest.mark.parametrize("K", [2, 3])
def test_ebkd_weights_random_large_logits(K):
    rng = np.random.default_rng(K)
    t = (rng.normal(size=(16, K, 10)) * rng.choice([1.0, 10.0, 40.0], size=(16, K, 1))).astype(np.float32)
    w = ebkd_weights(torch.from_numpy(t))
    assert np.allclose(w.numpy(), dec_ebkd_weights(t), rtol=0, atol=2e-7)


@pytest.mark.parametrize("K", [2, 3])
def test_ebkd_zero_entropy_everywhere_gives_k_minus_1_over_k(K):
    """Margins beyond float64's range: every entropy is 0; the ratio is taken as 1/K."""
    t = one_hot_like([[2000.0] * K, [1600.0 + 100 * k for k in range(K)]])
    w = ebkd_weights(torch.from_numpy(t))
    assert torch.equal(w, torch.full((2, K), (K - 1) / K))


def test_ebkd_zero_entropy_teacher_beside_uncertain_ones():
    """A teacher with exactly zero entropy gets weight 1, the others share K - 2."""
    t = one_hot_like([[2000.0, 3.0, 5.0]])
    w = ebkd_weights(torch.from_numpy(t)).double()
    expected = dec_ebkd_weights(one_hot_like([[1e9, 3.0, 5.0]]))  # 1e9: entropy 0 at 60 digits too
    assert w[0, 0].item() == 1.0 and np.allclose(w.numpy(), expected, rtol=0, atol=2e-7)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_ebkd_loss_extreme_matches_oracle(K):
    t = one_hot_like([row[:K] for row in EXTREME["pm50"] + EXTREME["near_tiny"]])
    B, _, C = t.shape
    s = np.random.default_rng(0).normal(size=(B, C)).astype(np.float32)
    method = create_method("ebkd", num_classes=C, num_teachers=K, student_feat_shapes=[], teacher_feat_shapes={})
    losses, diag = method(
        StudentOut(logits=torch.from_numpy(s)), TeacherOut(logits=torch.from_numpy(t)), torch.zeros(B, dtype=torch.long), epoch=2
    )
    w = dec_ebkd_weights(t)
    lp_s = torch.log_softmax(torch.from_numpy(s).double() / T, -1).numpy()
    kl = np.zeros((B, K))
    for b in range(B):
        for k in range(K):
            lp_t = torch.log_softmax(torch.from_numpy(t[b, k]).double() / T, -1).numpy()
            kl[b, k] = T * T * float(np.sum(np.exp(lp_t) * (lp_t - lp_s[b])))
    assert np.isclose(losses["kd"].item(), (w * kl).sum() / (B * K), rtol=1e-5, atol=0)
    shares = w.mean(0) / w.mean(0).sum()
    assert np.allclose(np.asarray(diag["teacher_weights"], dtype=np.float64), shares, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ camkd's confidence weights
def dec_ca_weights(t: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[B, K] ``(1 - softmax_k(CE_k)) / (K - 1)`` at 60 digits (K = 1: 1)."""
    B, K, _ = t.shape
    w = np.ones((B, K))
    if K == 1:
        return w
    with localcontext() as ctx:
        ctx.prec = 60
        for b in range(B):
            ce = []
            for k in range(K):
                z = [Decimal(float(v)) for v in t[b, k]]
                m = max(z)
                ce.append(sum((v - m).exp() for v in z).ln() + m - z[y[b]])
            top = max(ce)
            e = [(c - top).exp() for c in ce]
            for k in range(K):
                w[b, k] = float((1 - e[k] / sum(e)) / (K - 1))
    return w


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("case", sorted(EXTREME))
def test_camkd_weights_extreme_match_high_precision(case, K):
    """Right and wrong near-one-hot teachers: CE 0 or ~margin; weights within float32 round-off, sum 1."""
    from camkd.methods.camkd import camkd_kd_loss

    t = one_hot_like([row[:K] for row in EXTREME[case]])
    B, _, C = t.shape
    y = np.arange(B) % C  # teacher 0 is right on every sample, the others wrong
    s = torch.zeros(B, C)
    loss, w = camkd_kd_loss(s, torch.from_numpy(t), torch.from_numpy(y), T=T)
    assert torch.isfinite(loss)
    assert np.allclose(w.double().numpy(), dec_ca_weights(t, y), rtol=0, atol=2e-7)
    assert np.allclose(w.double().sum(1).numpy(), 1.0, rtol=0, atol=2e-7)
