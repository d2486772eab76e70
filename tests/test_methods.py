"""Tests for the distillation methods (camkd.methods).

Golden values are computed here, independently, with plain numpy and explicit loops
written from the formulas of the CA-MKD reference (Rorozhl/CA-MKD helper/loops.py,
distiller_zoo/CAMKD.py, distiller_zoo/KD.py, models/util.py, helper/optimization.py;
RepDistiller distiller_zoo/FitNet.py); they never call camkd's loss functions.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camkd.config import LossConfig
from camkd.errors import CamkdError
from camkd.methods import StudentOut, TeacherOut, create_method, list_methods, required_layers
from camkd.models import create_model

ALL = ["aekd", "avg", "camkd", "ce", "ebkd", "fitnet", "kd"]
T = 4.0


# ------------------------------------------------------------------ numpy oracles
def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def np_kl(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    """KL(softmax(t/T) || softmax(s/T)) summed over classes, times T^2, one sample."""
    lps, lpt = np_log_softmax(s / temp), np_log_softmax(t / temp)
    return float(temp * temp * sum(np.exp(lpt[c]) * (lpt[c] - lps[c]) for c in range(len(s))))


def np_ce(z: np.ndarray, y: int) -> float:
    return float(-np_log_softmax(z)[y])


def np_softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(x))


def np_ca_weights(ce_row: np.ndarray) -> np.ndarray:
    K = len(ce_row)
    return (1.0 - np_softmax(ce_row)) / (K - 1)


def np_bn_train(y: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = y.mean(axis=(0, 2, 3), keepdims=True)
    var = y.var(axis=(0, 2, 3), keepdims=True)  # biased, as BN normalizes in training
    return (y - mu) / np.sqrt(var + eps)


def np_conv_valid(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Valid cross-correlation, stride 1, explicit loops over output positions."""
    B, _, H, W = x.shape
    O, _, kh, kw = w.shape
    out = np.zeros((B, O, H - kh + 1, W - kw + 1))
    for i in range(H - kh + 1):
        for j in range(W - kw + 1):
            patch = x[:, :, i : i + kh, j : j + kw]
            out[:, :, i, j] = np.einsum("bchw,ochw->bo", patch, w) + b
    return out


def np_bilinear(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """Bilinear resize with align_corners=False (half-pixel centres, clamped at 0)."""
    B, C, H, W = x.shape

    def taps(n_in: int, n_out: int) -> list[tuple[int, int, float]]:
        res = []
        for o in range(n_out):
            src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = int(np.floor(src))
            i1 = min(i0 + 1, n_in - 1)
            res.append((i0, i1, src - i0))
        return res

    out = np.zeros((B, C, oh, ow))
    for i, (y0, y1, ly) in enumerate(taps(H, oh)):
        for j, (x0, x1, lx) in enumerate(taps(W, ow)):
            out[:, :, i, j] = (
                (1 - ly) * (1 - lx) * x[:, :, y0, x0]
                + (1 - ly) * lx * x[:, :, y0, x1]
                + ly * (1 - lx) * x[:, :, y1, x0]
                + ly * lx * x[:, :, y1, x1]
            )
    return out


# ------------------------------------------------------------------ fixtures
def fixed_logits(B: int = 5, K: int = 3, C: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(B, C)).astype(np.float32) * 2
    t = rng.normal(size=(B, K, C)).astype(np.float32) * 3
    y = rng.integers(0, C, size=B)
    return s, t, y


def as_torch(s, t, y):
    return torch.from_numpy(s), torch.from_numpy(t), torch.from_numpy(y).long()


def make(name: str, K: int = 3, C: int = 6, **kw):
    return create_method(name, num_classes=C, num_teachers=K, student_feat_shapes=[], teacher_feat_shapes={},
                         loss=LossConfig(**kw))


def run(method, s, t, y, epoch: int = 2, feats=None, tfeats=None, heads=None):
    return method(
        StudentOut(logits=s, feats=feats or []),
        TeacherOut(logits=t, features=tfeats or {}, heads=heads or []),
        y,
        epoch=epoch,
    )


def weights(diag, key: str = "teacher_weights") -> np.ndarray:
    """A diagnostics entry as float64 numpy, after checking the contract: a detached float32 [K] tensor."""
    v = diag[key]
    assert isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.dim() == 1 and not v.requires_grad
    return v.double().numpy()


def close(a, b, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    return np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


# ------------------------------------------------------------------ registry
def test_registry_lists_all_seven():
    assert list_methods() == ALL


def test_unknown_method_lists_names():
    with pytest.raises(CamkdError) as e:
        make("nope")
    assert str(e.value) == ("unknown method 'nope'; choose one of: aekd, avg, camkd, ce, ebkd, fitnet, kd")


def test_required_layers_and_defaults():
    s_shapes = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]
    pen = {"penultimate": [(64, 8, 8)] * 2}
    for name in ["ce", "kd", "avg", "ebkd", "aekd"]:
        m = make(name, K=2)
        assert required_layers(name, LossConfig()) == ()
        assert list(m.parameters()) == []
    cam = create_method("camkd", num_classes=6, num_teachers=2, student_feat_shapes=s_shapes, teacher_feat_shapes=pen)
    assert cam.beta == 50.0 and required_layers("camkd", LossConfig()) == ("penultimate",)
    assert len(list(cam.parameters())) > 0
    cam0 = create_method("camkd", num_classes=6, num_teachers=2, student_feat_shapes=[], teacher_feat_shapes={},
                         loss=LossConfig(beta=0))
    assert required_layers("camkd", LossConfig(beta=0)) == () and list(cam0.parameters()) == []
    hint = {"hint2": [(32, 16, 16)] * 2, "hint1": [(16, 32, 32)] * 2}
    fit = create_method("fitnet", num_classes=6, num_teachers=2, student_feat_shapes=s_shapes, teacher_feat_shapes=hint)
    assert fit.beta == 100.0 and required_layers("fitnet", LossConfig()) == ("hint2",)
    fit1 = create_method(
        "fitnet",
        num_classes=6,
        num_teachers=2,
        student_feat_shapes=s_shapes,
        teacher_feat_shapes=hint,
        loss=LossConfig(hint_layer=1),
    )
    assert fit1.layer == "hint1" and required_layers("fitnet", LossConfig(hint_layer=1)) == ("hint1",)
    fit0 = make("fitnet", K=2, beta=0.0)
    assert required_layers("fitnet", LossConfig(beta=0.0)) == () and list(fit0.parameters()) == []


@pytest.mark.parametrize(
    "kw",
    [
        {"kd_T": 0.0},
        {"beta": -1.0},
        {"gamma": float("nan")},
        {"num_teachers": 0},
        {"num_classes": 0},
        {"aekd_C": 0.0},
    ],
)
def test_bad_numbers(kw):
    sizes = {k: kw.pop(k) for k in ("num_classes", "num_teachers") if k in kw}
    args = {**dict(num_classes=6, num_teachers=2, student_feat_shapes=[], teacher_feat_shapes={}), **sizes}
    with pytest.raises(CamkdError):
        create_method("kd", **args, loss=LossConfig(**kw))


# ------------------------------------------------------------------ ce / kd / avg
def test_ce_only():
    s, t, y = fixed_logits()
    losses, diag = run(make("ce", gamma=0.7), *as_torch(s, t, y))
    assert set(losses) == {"ce"} and diag == {}
    expected = 0.7 * np.mean([np_ce(s[b], y[b]) for b in range(len(y))])
    assert close(losses["ce"].item(), expected)


def test_kd_against_mean_teacher():
    s, t, y = fixed_logits()
    B, K, _ = t.shape
    losses, diag = run(make("kd", alpha=0.5, gamma=2.0), *as_torch(s, t, y))
    mean_t = t.astype(np.float64).mean(1)
    expected = 0.5 * sum(np_kl(s[b], mean_t[b], T) for b in range(B)) / B
    assert close(losses["kd"].item(), expected)
    assert close(losses["ce"].item(), 2.0 * np.mean([np_ce(s[b], y[b]) for b in range(B)]))
    assert close(weights(diag), [1 / K] * K)


def test_avg_mean_of_per_teacher_kl():
    s, t, y = fixed_logits()
    B, K, _ = t.shape
    losses, diag = run(make("avg", alpha=1.5), *as_torch(s, t, y))
    per_teacher = [sum(np_kl(s[b], t[b, k], T) for b in range(B)) / B for k in range(K)]
    assert close(losses["kd"].item(), 1.5 * np.mean(per_teacher))
    assert close(weights(diag), [1 / K] * K)


def test_single_teacher_kd_avg_camkd_agree():
    s, t, y = fixed_logits(K=1)
    B = len(y)
    plain = sum(np_kl(s[b], t[b, 0], T) for b in range(B)) / B
    for name in ["kd", "avg", "camkd", "ebkd", "aekd"]:
        losses, diag = run(make(name, K=1, beta=0.0), *as_torch(s, t, y))
        assert close(losses["kd"].item(), plain), name
        assert close(weights(diag), [1.0]), name


# ------------------------------------------------------------------ ebkd
def test_ebkd_weights_and_loss():
    s, t, y = fixed_logits()
    B, K, _ = t.shape
    losses, diag = run(make("ebkd"), *as_torch(s, t, y))
    w = np.zeros((B, K))
    for b in range(B):
        H = []
        for k in range(K):
            p = np_softmax(t[b, k])  # temperature 1, as the reference
            H.append(-sum(p[c] * np.log(p[c]) for c in range(len(p))))
        for k in range(K):
            w[b, k] = 1.0 - H[k] / sum(H)
    expected = sum(w[b, k] * np_kl(s[b], t[b, k], T) for b in range(B) for k in range(K)) / (B * K)
    assert close(losses["kd"].item(), expected)
    assert close(weights(diag), w.mean(0) / (K - 1))
    assert close(sum(weights(diag)), 1.0)


def test_ebkd_one_hot_teachers_are_finite():
    s = torch.zeros(2, 3)
    t = torch.tensor([[[100.0, -100, -100], [-100, 100, -100]]] * 2)  # ~zero entropy
    losses, _ = run(make("ebkd", K=2, C=3), s, t, torch.tensor([0, 1]))
    assert torch.isfinite(losses["kd"])


# ------------------------------------------------------------------ camkd (logit level)
def test_camkd_logit_weights_and_kd():
    s, t, y = fixed_logits()
    B, K, _ = t.shape
    losses, diag = run(make("camkd", beta=0.0, alpha=0.8), *as_torch(s, t, y))
    assert set(losses) == {"ce", "kd"}
    w = np.array([np_ca_weights(np.array([np_ce(t[b, k], y[b]) for k in range(K)])) for b in range(B)])
    assert close(w.sum(1), 1.0)
    expected = sum(w[b, k] * np_kl(s[b], t[b, k], T) for b in range(B) for k in range(K)) / (B * K)
    assert close(losses["kd"].item(), 0.8 * expected)
    assert close(weights(diag), w.mean(0))


def test_camkd_more_confident_teacher_weighs_more():
    y = torch.tensor([0])
    t = torch.tensor([[[5.0, 0, 0], [0, 5.0, 0]]])  # teacher 0 right, teacher 1 wrong
    _, diag = run(make("camkd", K=2, C=3, beta=0.0), torch.zeros(1, 3), t, y)
    assert weights(diag)[0] > weights(diag)[1]


# ------------------------------------------------------------------ camkd (intermediate)
B_I, C_S, NCLS = 4, 2, 5
T_SHAPES = [(3, 2, 2), (2, 4, 4), (3, 8, 8)]  # pool down, same size, bilinear up


def camkd_setup(seed: int = 1, K: int = 3, beta: float = 2.0):
    rng = np.random.default_rng(seed)
    shapes = T_SHAPES[:K]
    f_s = rng.normal(size=(B_I, C_S, 4, 4)).astype(np.float32)
    f_t = [rng.normal(size=(B_I, *sh)).astype(np.float32) for sh in shapes]
    emb_w = [rng.normal(size=(sh[0], C_S)).astype(np.float32) for sh in shapes]
    emb_b = [rng.normal(size=(sh[0],)).astype(np.float32) * 0.1 for sh in shapes]
    head_w = [rng.normal(size=(NCLS, sh[0])).astype(np.float32) for sh in shapes]
    head_b = [rng.normal(size=(NCLS,)).astype(np.float32) for sh in shapes]
    s, t, y = fixed_logits(B=B_I, K=K, C=NCLS, seed=seed)
    method = create_method(
        "camkd",
        num_classes=NCLS,
        num_teachers=K,
        student_feat_shapes=[(C_S, 4, 4), (C_S,)],
        teacher_feat_shapes={"penultimate": shapes},
        loss=LossConfig(beta=beta),
    )
    for k in range(K):
        method.embeds[k].conv.weight.data.copy_(torch.from_numpy(emb_w[k])[:, :, None, None])
        method.embeds[k].conv.bias.data.copy_(torch.from_numpy(emb_b[k]))
    heads = []
    for k, sh in enumerate(shapes):
        fc = nn.Linear(sh[0], NCLS)
        fc.weight.data.copy_(torch.from_numpy(head_w[k]))
        fc.bias.data.copy_(torch.from_numpy(head_b[k]))
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval().requires_grad_(False)
        heads.append(head)
    np_data = dict(f_s=f_s, f_t=f_t, emb_w=emb_w, emb_b=emb_b, head_w=head_w, head_b=head_b, y=y)
    torch_args = dict(
        s=torch.from_numpy(s),
        t=torch.from_numpy(t),
        y=torch.from_numpy(y).long(),
        feats=[torch.from_numpy(f_s).requires_grad_(True), torch.zeros(B_I, C_S)],
        tfeats={"penultimate": [torch.from_numpy(f) for f in f_t]},
        heads=heads,
    )
    return method, np_data, torch_args


def np_camkd_inter(d) -> tuple[float, np.ndarray]:
    f_s = d["f_s"].astype(np.float64)
    K = len(d["f_t"])
    mse = np.zeros((B_I, K))
    ce = np.zeros((B_I, K))
    for k in range(K):
        c, h, w = d["f_t"][k].shape[1:]
        if (h, w) == (4, 4):
            x = f_s
        elif h < 4:  # exact 2x average pooling
            x = f_s.reshape(B_I, C_S, h, 4 // h, w, 4 // w).mean(axis=(3, 5))
        else:
            x = np_bilinear(f_s, h, w)
        e = np.einsum("oc,bchw->bohw", d["emb_w"][k], x) + d["emb_b"][k][None, :, None, None]
        e = np.maximum(np_bn_train(e), 0.0)
        logits = e.mean(axis=(2, 3)) @ d["head_w"][k].T + d["head_b"][k]
        for b in range(B_I):
            ce[b, k] = np_ce(logits[b], d["y"][b])
            mse[b, k] = np.mean((e[b] - d["f_t"][k][b]) ** 2)
    v = np.array([np_ca_weights(ce[b]) for b in range(B_I)]) if K > 1 else np.ones((B_I, 1))
    return float((v * mse).sum() / (B_I * K)), v


def test_camkd_intermediate_golden():
    method, d, a = camkd_setup()
    losses, diag = run(method, a["s"], a["t"], a["y"], 2, a["feats"], a["tfeats"], a["heads"])
    expected, v = np_camkd_inter(d)
    assert close(losses["inter"].item(), 2.0 * expected, rtol=1e-4)
    assert close(weights(diag, "inter_weights"), v.mean(0), rtol=1e-4)
    # the logit-level part is the same as with beta = 0
    ref, _ = run(make("camkd", C=NCLS, beta=0.0), a["s"], a["t"], a["y"])
    assert close(losses["kd"].item(), ref["kd"].item())


def test_camkd_single_teacher_intermediate_weight_one():
    method, d, a = camkd_setup(K=1, beta=1.0)
    losses, diag = run(method, a["s"], a["t"], a["y"], 2, a["feats"], a["tfeats"], a["heads"])
    expected, _ = np_camkd_inter(d)
    assert close(losses["inter"].item(), expected, rtol=1e-4)
    assert weights(diag, "inter_weights").tolist() == [1.0]


def test_camkd_epoch1_skips_beta_term():
    method, _, a = camkd_setup()
    l1, d1 = run(method, a["s"], a["t"], a["y"], 1, a["feats"], a["tfeats"], a["heads"])
    l2, _ = run(method, a["s"], a["t"], a["y"], 2, a["feats"], a["tfeats"], a["heads"])
    assert l1["inter"].item() == 0.0 and l2["inter"].item() > 0
    assert "inter_weights" not in d1
    assert l1["kd"].item() == l2["kd"].item() and l1["ce"].item() == l2["ce"].item()


def test_camkd_intermediate_weights_not_detached():
    """Our gradient equals that of the full formula (weights differentiated), not the detached one."""
    method, _, a = camkd_setup()
    params = [p for e in method.embeds for p in (e.conv.weight, e.conv.bias)]
    losses, _ = run(method, a["s"], a["t"], a["y"], 2, a["feats"], a["tfeats"], a["heads"])
    ours = torch.autograd.grad(losses["inter"], params)

    def oracle(detach: bool) -> torch.Tensor:
        f_s = a["feats"][0]
        ces, mses = [], []
        for k, emb in enumerate(method.embeds):
            h, w = a["tfeats"]["penultimate"][k].shape[2:]
            if h == 4:
                x = f_s
            elif h < 4:
                x = F.avg_pool2d(f_s, 4 // h)
            else:
                x = F.interpolate(f_s, size=(h, w), mode="bilinear")
            e = F.relu(F.batch_norm(F.conv2d(x, emb.conv.weight, emb.conv.bias), None, None, training=True))
            ces.append(F.cross_entropy(a["heads"][k](e), a["y"], reduction="none"))
            mses.append(((e - a["tfeats"]["penultimate"][k]) ** 2).mean(dim=(1, 2, 3)))
        ce, mse = torch.stack(ces, 1), torch.stack(mses, 1)
        v = (1 - torch.softmax(ce, 1)) / (ce.shape[1] - 1)
        if detach:
            v = v.detach()
        return 2.0 * (v * mse).sum() / mse.numel()

    full = torch.autograd.grad(oracle(False), params)
    det = torch.autograd.grad(oracle(True), params)
    for g, f in zip(ours, full):
        assert torch.allclose(g, f, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(g, d, rtol=1e-3, atol=1e-6) for g, d in zip(ours, det))


def test_camkd_heads_stay_frozen_and_outside_method():
    method, _, a = camkd_setup()
    losses, _ = run(method, a["s"], a["t"], a["y"], 2, a["feats"], a["tfeats"], a["heads"])
    sum(losses.values()).backward()
    head_params = {id(p) for h in a["heads"] for p in h.parameters()}
    assert not head_params & {id(p) for p in method.parameters()}
    assert all(p.grad is None for h in a["heads"] for p in h.parameters())
    assert a["feats"][0].grad is not None and torch.isfinite(a["feats"][0].grad).all()


# ------------------------------------------------------------------ aekd
def np_aekd_grads(s, t, temp):
    """Batch-mean gradient of DistillKL(s, t_k) (batchmean, x T^2) w.r.t. the student logits."""
    B, K, _ = t.shape
    g = np.zeros((K, s.shape[1]))
    for k in range(K):
        for b in range(B):
            g[k] += temp / B * (np_softmax(s[b] / temp) - np_softmax(t[b, k] / temp))
        g[k] /= B
    return g


def test_aekd_identical_teachers_uniform():
    s, t, y = fixed_logits(K=1)
    t2 = np.repeat(t, 2, axis=1)
    losses, diag = run(make("aekd", K=2), *as_torch(s, t2, y))
    assert close(weights(diag), [0.5, 0.5])
    B = len(y)
    assert close(losses["kd"].item(), sum(np_kl(s[b], t[b, 0], T) for b in range(B)) / B)


def two_teacher_case(seed: int, opposed: bool):
    """Random logits; ``opposed`` makes teacher 1 pull the student the other way (interior optimum)."""
    s, t, y = fixed_logits(K=2, seed=seed)
    if opposed:
        noise = np.random.default_rng(seed).normal(size=s.shape).astype(np.float32) * 0.5
        t[:, 1] = 2 * s - t[:, 0] + noise
    return s, t, y


def two_teacher_a(s, t) -> float:
    g = np_aekd_grads(s.astype(np.float64), t.astype(np.float64), T)
    G = g @ g.T
    return (G[1, 1] - G[0, 1]) / (G[0, 0] + G[1, 1] - 2 * G[0, 1])


CASES_2T = [(0, False), (3, False), (1, True), (2, True), (4, True)]


@pytest.mark.parametrize(("seed", "opposed"), CASES_2T)
def test_aekd_two_teachers_closed_form(seed, opposed):
    """K = 2: w = (a, 1-a), a = clip((G22 - G12) / (G11 + G22 - 2 G12), 1 - C, C) with C = 0.6."""
    s, t, y = two_teacher_case(seed, opposed)
    losses, diag = run(make("aekd", K=2), *as_torch(s, t, y))
    a = min(max(two_teacher_a(s, t), 0.4), 0.6)
    assert close(weights(diag), [a, 1 - a], rtol=1e-5, atol=1e-6)
    B = len(y)
    kl = [sum(np_kl(s[b], t[b, k], T) for b in range(B)) / B for k in range(2)]
    assert close(losses["kd"].item(), a * kl[0] + (1 - a) * kl[1])


def test_aekd_two_teachers_both_regimes_seen():
    """The cases above include interior and clipped solutions (so both branches are tested)."""
    kinds = {bool(0.4 < two_teacher_a(*two_teacher_case(seed, o)[:2]) < 0.6) for seed, o in CASES_2T}
    assert kinds == {True, False}


@pytest.mark.parametrize("K", [3, 4])
def test_aekd_weights_optimal_on_capped_simplex(K):
    s, t, y = fixed_logits(B=8, K=K, C=7, seed=K)
    _, diag = run(make("aekd", K=K, C=7), *as_torch(s, t, y))
    w = weights(diag)
    cap = max(0.6, 1 / K)
    assert (w >= 0).all() and (w <= cap + 1e-6).all() and abs(w.sum() - 1) < 1e-6
    g = np_aekd_grads(s.astype(np.float64), t.astype(np.float64), T)
    G = g @ g.T
    f = w @ G @ w
    # no point of a dense grid on the capped simplex does better
    steps = np.linspace(0, 1, 41)
    for p in itertools.product(steps, repeat=K - 1):
        last = 1 - sum(p)
        q = np.array([*p, last])
        if last < 0 or (q > cap).any():
            continue
        assert f <= q @ G @ q + 1e-9 * abs(f) + 1e-15


def test_aekd_weights_detached():
    s, t, y = fixed_logits()
    st, tt, yt = as_torch(s, t, y)
    st.requires_grad_(True)
    losses, diag = run(make("aekd"), st, tt, yt)
    (grad,) = torch.autograd.grad(losses["kd"], st)
    B, K, _ = t.shape
    w = weights(diag)
    expected = np.zeros_like(s, dtype=np.float64)
    for b in range(B):
        for k in range(K):
            expected[b] += w[k] * T / B * (np_softmax(s[b] / T) - np_softmax(t[b, k] / T))
    assert close(grad.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_aekd_too_many_teachers():
    with pytest.raises(CamkdError, match="at most"):
        make("aekd", K=9)


# ------------------------------------------------------------------ fitnet
def fitnet_setup(beta: float = 3.0):
    rng = np.random.default_rng(5)
    B, C_s = 4, 2
    t_shapes = [(3, 4, 4), (3, 3, 3)]  # kernel 1x1 and 2x2 valid convs
    f_s = rng.normal(size=(B, C_s, 4, 4)).astype(np.float32)
    f_t = [rng.normal(size=(B, *sh)).astype(np.float32) for sh in t_shapes]
    method = create_method(
        "fitnet",
        num_classes=6,
        num_teachers=2,
        student_feat_shapes=[(C_s, 8, 8), (C_s, 4, 4), (C_s,)],
        teacher_feat_shapes={"hint1": t_shapes},
        loss=LossConfig(beta=beta, hint_layer=1),
    )
    ws, bs = [], []
    for reg in method.regressors:
        w = rng.normal(size=tuple(reg.conv.weight.shape)).astype(np.float32)
        b = rng.normal(size=tuple(reg.conv.bias.shape)).astype(np.float32)
        reg.conv.weight.data.copy_(torch.from_numpy(w))
        reg.conv.bias.data.copy_(torch.from_numpy(b))
        ws.append(w)
        bs.append(b)
    s, t, y = fixed_logits(B=B, K=2)
    feats = [torch.zeros(B, C_s, 8, 8), torch.from_numpy(f_s).requires_grad_(True), torch.zeros(B, C_s)]
    return method, (f_s, f_t, ws, bs), (s, t, y), feats


def test_fitnet_value_and_gradients():
    method, (f_s, f_t, ws, bs), (s, t, y), feats = fitnet_setup()
    st, tt, yt = as_torch(s, t, y)
    tf = {"hint1": [torch.from_numpy(f) for f in f_t]}
    losses, diag = run(method, st, tt, yt, 2, feats, tf)
    per_teacher = []
    for k in range(2):
        r = np_conv_valid(f_s.astype(np.float64), ws[k].astype(np.float64), bs[k].astype(np.float64))
        r = np.maximum(np_bn_train(r), 0.0)
        per_teacher.append(np.mean((r - f_t[k]) ** 2))
    assert close(losses["hint"].item(), 3.0 * np.mean(per_teacher), rtol=1e-4)
    B = len(y)
    kl = [sum(np_kl(s[b], t[b, k], T) for b in range(B)) / B for k in range(2)]
    assert close(losses["kd"].item(), np.mean(kl))
    assert close(weights(diag), [0.5, 0.5])
    losses["hint"].backward()
    for p in method.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert feats[1].grad is not None and feats[1].grad.abs().sum() > 0


def test_fitnet_epoch1_skips_hint():
    method, (_, f_t, _, _), (s, t, y), feats = fitnet_setup()
    losses, _ = run(method, *as_torch(s, t, y), 1, feats, {"hint1": [torch.from_numpy(f) for f in f_t]})
    assert losses["hint"].item() == 0.0


@pytest.mark.parametrize(
    ("s_shape", "t_shape", "ok"),
    [
        ((8, 16, 16), (4, 8, 8), True),  # stride-2 conv
        ((8, 8, 8), (4, 16, 16), True),  # transposed conv
        ((8, 4, 4), (4, 16, 16), True),  # bilinear then 3x3 (CA-MKD's 4x case)
        ((8, 3, 3), (4, 8, 8), True),  # any smaller map: bilinear then 3x3
        ((8, 8, 8), (4, 5, 5), True),  # valid conv 4x4
        ((8, 4, 2), (4, 3, 3), False),  # taller but narrower
        ((8, 8, 8), (4, 4, 6), False),  # stride-2 conv cannot give width 6
    ],
)
def test_fitnet_convreg_shapes(s_shape, t_shape, ok):
    def build():
        return create_method(
            "fitnet",
            num_classes=6,
            num_teachers=1,
            student_feat_shapes=[s_shape, (8,)],
            teacher_feat_shapes={"hint0": [t_shape]},
            loss=LossConfig(hint_layer=0),
        )

    if not ok:
        with pytest.raises(CamkdError, match="cannot regress"):
            build()
        return
    method = build()
    out = method.regressors[0](torch.randn(2, *s_shape))
    assert tuple(out.shape[1:]) == t_shape


# ------------------------------------------------------------------ mismatches
@pytest.mark.parametrize(
    ("name", "s_shapes", "t_feats", "kw"),
    [
        ("camkd", [(64, 8, 8), (64,), (10,)], {"penultimate": [(64, 8, 8)] * 2}, {}),  # feats[-2] is 1-D
        ("camkd", [(64, 8, 8), (64,)], {"penultimate": [(64,), (64, 8, 8)]}, {}),  # teacher 1-D
        ("camkd", [(64, 8, 8), (64,)], {}, {}),  # features missing
        ("camkd", [(64, 8, 8), (64,)], {"penultimate": [(64, 8, 8)]}, {}),  # 1 shape for 2 teachers
        ("camkd", [], {"penultimate": [(64, 8, 8)] * 2}, {}),  # no student features
        ("fitnet", [(16, 8, 8), (16,)], {"hint2": [(16, 8, 8)] * 2}, {}),  # hint layer out of range
        ("fitnet", [(16, 8, 8), (16,), (10,)], {"hint1": [(16, 8, 8)] * 2}, {"hint_layer": 1}),  # 1-D hint
    ],
)
def test_feature_mismatch_is_user_error(name, s_shapes, t_feats, kw):
    with pytest.raises(CamkdError) as e:
        create_method(
            name,
            num_classes=10,
            num_teachers=2,
            student_feat_shapes=s_shapes,
            teacher_feat_shapes=t_feats,
            loss=LossConfig(**kw),
        )
    assert "\n" not in str(e.value)


def test_wrong_teacher_logits_shape():
    s, t, y = fixed_logits(K=3)
    with pytest.raises(CamkdError, match="teacher logits"):
        run(make("avg", K=2), *as_torch(s, t, y))


# ------------------------------------------------------------------ real models, every method
@functools.cache
def real_teachers(archs: tuple[str, ...]):
    """A fixed batch, frozen random teachers and their outputs (built once per arch tuple)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    teachers = [create_model(a, num_classes=10).eval().requires_grad_(False) for a in archs]
    with torch.no_grad():
        t_out = [m(x, is_feat=True) for m in teachers]
    return x, y, teachers, t_out


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    ("student_arch", "teacher_archs"),
    [("resnet8", ["resnet8x4", "vgg8"]), ("vgg8", ["resnet8x4", "resnet8"])],
)
def test_backward_every_method_real_models(name, student_arch, teacher_archs):
    ncls = 10
    x, y, teachers, t_out = real_teachers(tuple(teacher_archs))
    torch.manual_seed(1)
    student = create_model(student_arch, num_classes=ncls).train()
    feats_s, logits_s = student(x, is_feat=True)
    hint_layer = 2
    t_shapes = {
        "penultimate": [tuple(f[-2].shape[1:]) for f, _ in t_out],
        f"hint{hint_layer}": [tuple(f[hint_layer].shape[1:]) for f, _ in t_out],
    }
    method = create_method(
        name,
        num_classes=ncls,
        num_teachers=len(teachers),
        student_feat_shapes=[tuple(f.shape[1:]) for f in feats_s],
        teacher_feat_shapes=t_shapes,
        loss=LossConfig(hint_layer=hint_layer),
    ).train()
    layer_index = {"penultimate": -2, f"hint{hint_layer}": hint_layer}
    features = {n: [f[layer_index[n]] for f, _ in t_out] for n in required_layers(name, LossConfig(hint_layer=hint_layer))}
    heads = [m.get_head() for m in teachers]
    t_logits = torch.stack([lg for _, lg in t_out], 1)
    losses, diag = method(
        StudentOut(logits=logits_s, feats=feats_s),
        TeacherOut(logits=t_logits, features=features, heads=heads),
        y,
        epoch=2,
    )
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    for p in method.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert all(p.grad is None for m in teachers for p in m.parameters())
    if name != "ce":
        assert len(weights(diag)) == 2 and close(sum(weights(diag)), 1.0)
    if name in ("camkd", "fitnet"):
        assert len(list(method.parameters())) > 0
        assert set(losses) == {"ce", "kd", "inter" if name == "camkd" else "hint"}


def test_the_loss_defaults_are_stated_once_in_loss_config():
    """create_method without a LossConfig, the distill command's options and DistillConfig all take LossConfig's
    (the command's options are None when left out, so that one given for a method that ignores it is refused; their
    help shows LossConfig's numbers)."""
    import inspect
    from dataclasses import asdict

    from camkd.cli import distill_cmd
    from camkd.distill import DistillConfig

    defaults = asdict(LossConfig())
    sig = inspect.signature(distill_cmd).parameters
    options = {"gamma": "gamma", "alpha": "alpha", "beta": "beta", "kd_T": "kd_t", "aekd_C": "aekd_c", "hint_layer": "hint_layer"}
    assert all(sig[param].default is None for param in options.values())
    for field, param in options.items():
        if field != "beta":  # beta's default is per method (camkd 50, fitnet 100)
            assert f"[default: {defaults[field]:g}]" in sig[param].annotation.__metadata__[0].help, field
    assert asdict(DistillConfig(arch="resnet8").loss) == defaults
    m = make("aekd")
    assert (m.gamma, m.alpha, m.kd_T, m.C) == (defaults["gamma"], defaults["alpha"], defaults["kd_T"], defaults["aekd_C"])
