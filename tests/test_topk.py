"""Top-k logit stores (issue 11): what is stored, and how far each method's loss is from the dense store's.

Three seeded resnet8 teachers on synthetic data (10 classes); their heads are scaled x10, x20, x30 so
the teachers range from soft to peaked.  Every store is float32, so a dense store and a top-k store
hold the same logits for the kept classes and the only difference is what the top-k store drops.

Tolerances are derived, not tuned: with the tail bin, per sample and teacher,
``0 <= KL_dense - KL_binned = Q KL(q|tail || p|tail) <= Q log(P / min_{c in tail} p_c)`` (T^2 times
that at temperature T), where Q and P are the teacher's and the student's tail masses; a float32
slack of 1e-5 relative covers round-off.  With k = C - 1 the tail is one class and every method
must equal the dense store's loss to round-off.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from camkd.cache import CacheConfig, cache_teachers, cache_verify
from camkd.config import LossConfig
from camkd.epoch_plan import EpochPlan
from camkd.errors import CamkdError
from camkd.methods import StudentOut, create_method
from camkd.methods.aekd import aekd_gradient_sums
from camkd.methods.camkd import camkd_kd_loss
from camkd.methods.ebkd import ebkd_weights
from camkd.methods.functional import binned_kl, confidence_weights, effective_teacher_probs, kl_per_sample
from camkd.models import create_model
from camkd.sources import StoreTeachers
from camkd.store import layout, open_store, topk
from camkd.store.info import cache_info
from camkd.store.topk import teacher_entropies

N, C, T = 256, 10, 4.0
BASE = dict(dataset="synthetic", limit=N, views=2, aug_seed=3, features=["penultimate"], device="cpu", progress=False,
            evaluate=False, batch_size=64, dtype="float32")
LOGIT_METHODS = ["kd", "avg", "ebkd", "aekd", "camkd", "fitnet"]


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("teachers")
    out = []
    for i in range(3):
        torch.manual_seed(i)
        m = create_model("resnet8", num_classes=C, in_channels=3)
        with torch.no_grad():
            for p in m.get_head().parameters():
                p.mul_(10.0 * (i + 1))
        torch.save({"model": m.state_dict()}, root / f"t{i}.pth")
        out.append(f"resnet8={root / f't{i}.pth'}")
    return out


@pytest.fixture(scope="module")
def stores(specs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    kinds = {"dense": {}, "k9": dict(logits="topk:9"), "k5": dict(logits="topk:5", kd_T=[1.0, 4.0]),
             "k2": dict(logits="topk:2")}
    out = {}
    for name, kw in kinds.items():
        out[name] = root / f"{name}.zarr"
        cache_teachers(CacheConfig(teachers=specs, out=str(out[name]), **BASE, **kw))
    return out


def _batch(path: Path, view: int = 0, rows: int = 64):
    """The first batch of ``view`` as the training loop sees it (StoreTeachers.teacher_outputs), and its labels."""
    store = open_store(path)
    src = StoreTeachers(store, (), torch.device("cpu"), memory_budget_mb=64, temperature=T)
    plan = EpochPlan.cut(view, [np.arange(rows)], rows, drop_last=False)
    idx, data = plan.batches[0], next(iter(src.batches(plan)))
    labels = torch.from_numpy(store.labels()[idx])
    return src.teacher_outputs(torch.from_numpy(idx), None, data), labels


def _student(rows: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, C, generator=g) * 3


def _method(name: str):
    return create_method(name, num_classes=C, num_teachers=3, student_feat_shapes=[], teacher_feat_shapes={},
                         loss=LossConfig(beta=0.0, kd_T=T))


# -- what the store holds -------------------------------------------------------------------------
def test_topk_arrays_equal_the_dense_logits_and_exact_scalars(stores):
    dense, k5 = open_store(stores["dense"]), open_store(stores["k5"])
    assert k5.logits_spec == topk.LogitsSpec("topk", 5, (1.0, 4.0))
    g = zarr.open_group(str(stores["k5"]), mode="r")  # plain zarr reads it
    assert "logits" not in g and g["topk/index"].dtype == np.uint8
    labels = torch.from_numpy(dense.labels())
    for v in range(2):
        z = dense.logits(v)  # float32 [N, K, C]
        ref_vals, ref_idx = torch.topk(z, 5, dim=-1)
        idx = np.asarray(g["topk/index"][v]).astype(np.int64)
        assert np.array_equal(np.sort(idx, -1), np.sort(ref_idx.numpy(), -1))
        assert np.array_equal(np.asarray(g["topk/values"][v]), ref_vals.numpy())
        zd = z.double()
        for j, temp in enumerate((1.0, 4.0)):
            lse = (zd / temp).logsumexp(-1)
            kept = torch.zeros_like(zd, dtype=torch.bool).scatter_(-1, torch.from_numpy(idx), True)
            tail = (zd / temp).masked_fill(kept, -math.inf).logsumexp(-1) - lse
            assert np.allclose(np.asarray(g["topk/lse"][v])[..., j], lse.numpy(), rtol=1e-6, atol=1e-6)
            assert np.allclose(np.asarray(g["topk/log_tail"][v])[..., j], tail.numpy(), rtol=1e-6, atol=1e-6)
        ce = -(zd.log_softmax(-1).gather(-1, labels.view(-1, 1, 1).expand(-1, 3, 1))).squeeze(-1)
        assert np.allclose(np.asarray(g["topk/ce"][v]), ce.numpy(), rtol=1e-6, atol=1e-7)
        assert np.allclose(np.asarray(g["topk/log_entropy"][v]), teacher_entropies(z).log().numpy(), rtol=1e-6, atol=1e-6)
    # the tail mass per teacher is recorded at cache time, and it is what the arrays say
    tail = dense.attrs.get("topk_tail_mass")
    assert tail is None
    stats = k5.attrs["topk_tail_mass"]["4"]
    q = np.exp(np.asarray(g["topk/log_tail"][:, :, :, 1]).astype(np.float64)).reshape(-1, 3)
    assert np.allclose(stats["mean"], q.mean(0)) and np.allclose(stats["max"], q.max(0))
    assert stats["mean"][0] > stats["mean"][2]  # the soft teacher leaves more mass out than the peaked one
    info = cache_info(stores["k5"])
    assert "top-5 of 10 classes" in info and "tail mass  at T=4" in info
    assert re.search(r"logsumexp and tail at --kd-T [\d., ]+$", info.split("top-5 of 10 classes")[1].splitlines()[0])


def test_rebuilt_batch_keeps_the_exact_log_probabilities(stores):
    dense, _ = _batch(stores["dense"])
    tk, _ = _batch(stores["k5"])
    assert tk.kept.sum(-1).eq(5).all() and tk.temperature == T
    ref = F.log_softmax(dense.logits / T, -1)
    got = F.log_softmax(tk.logits / T, -1)
    assert torch.allclose(got[tk.kept], ref[tk.kept], atol=1e-5)
    q_tail = ref.exp().masked_fill(tk.kept, 0).sum(-1)  # the dense tail mass
    assert torch.allclose(got.exp().masked_fill(tk.kept, 0).sum(-1), q_tail, atol=1e-6)


# -- the loss, method by method ----------------------------------------------------------------------
@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_one_class_tail_equals_dense_for_every_method(stores, name):
    dense, labels = _batch(stores["dense"])
    tk, _ = _batch(stores["k9"])
    for seed in range(3):
        s = _student(seed=seed)
        ld, dd = _method(name)(StudentOut(logits=s), dense, labels, epoch=1)
        lt, dt = _method(name)(StudentOut(logits=s), tk, labels, epoch=1)
        assert torch.allclose(lt["kd"], ld["kd"], rtol=1e-5, atol=1e-6), (name, lt["kd"], ld["kd"])
        assert torch.allclose(dt["teacher_weights"], dd["teacher_weights"], rtol=1e-4, atol=1e-6)


def _bound(s: torch.Tensor, tk, dense) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and teacher: (dense KL - binned KL) and its bound T^2 Q log(P / min_tail p)."""
    log_ps = F.log_softmax(s / T, -1).unsqueeze(1).expand_as(tk.logits)
    gap = kl_per_sample(s, dense.logits, T=T) - kl_per_sample(s, tk.logits, T=T, kept=tk.kept)
    Q = F.softmax(dense.logits / T, -1).masked_fill(tk.kept, 0).sum(-1)
    log_P = log_ps.masked_fill(tk.kept, -math.inf).logsumexp(-1)
    min_p = log_ps.masked_fill(tk.kept, math.inf).amin(-1)
    return gap, T * T * Q * (log_P - min_p)


@pytest.mark.parametrize("k", ["k2", "k5"])
def test_per_sample_kl_gap_is_within_the_tail_bound(stores, k):
    dense, _ = _batch(stores["dense"])
    tk, _ = _batch(stores[k])
    for seed in range(3):
        gap, bound = _bound(_student(seed=seed), tk, dense)
        slack = 1e-5 * (1 + kl_per_sample(_student(seed=seed), dense.logits, T=T))
        assert (gap >= -slack).all() and (gap <= bound + slack).all()
        assert gap.max() > 1e-3  # the store drops something measurable: the test compares real differences


@pytest.mark.parametrize("k", ["k2", "k5"])
@pytest.mark.parametrize("name", ["avg", "fitnet", "camkd", "ebkd"])
def test_loss_gap_is_within_the_tail_bound(stores, k, name):
    """Methods with per-teacher KLs and exact weights: the batch loss gap is the weighted mean of the
    per-sample gaps, so its bound is the same weighted mean of the per-sample bounds."""
    dense, labels = _batch(stores["dense"])
    tk, _ = _batch(stores[k])
    for seed in range(3):
        s = _student(seed=seed)
        ld, dd = _method(name)(StudentOut(logits=s), dense, labels, epoch=1)
        lt, dt = _method(name)(StudentOut(logits=s), tk, labels, epoch=1)
        assert torch.allclose(dt["teacher_weights"], dd["teacher_weights"], rtol=1e-5, atol=1e-7)  # exact weights
        _, bound = _bound(s, tk, dense)
        if name == "camkd":
            ce = F.cross_entropy(dense.logits.reshape(-1, C), labels.repeat_interleave(3), reduction="none").view(-1, 3)
            w = confidence_weights(ce)
        elif name == "ebkd":
            w = ebkd_weights(dense.logits)
        else:
            w = torch.ones_like(bound)
        limit = (w * bound).mean()
        gap = ld["kd"] - lt["kd"]
        slack = 1e-5 * (1 + ld["kd"].abs())
        assert -slack <= gap <= limit + slack, (name, k, float(gap), float(limit))


@pytest.mark.parametrize("k", ["k2", "k5"])
def test_aekd_gradients_within_twice_the_tail_mass(stores, k):
    """AEKD's per-teacher batch gradient uses q on the kept classes and the tail mass shared as the
    student shares its own: per sample the two teacher distributions differ only on the tail, where each
    has mass Q, so the L1 distance of the batch-mean gradients is at most 2 mean(Q)."""
    dense, _ = _batch(stores["dense"])
    tk, _ = _batch(stores[k])
    s = _student()
    gd = aekd_gradient_sums(s, dense.logits, T=T)
    gt = aekd_gradient_sums(s, tk.logits, T=T, kept=tk.kept)
    Q = F.softmax(dense.logits / T, -1).masked_fill(tk.kept, 0).sum(-1)  # [B, K]
    l1 = (gd[:, :-1] - gt[:, :-1]).abs().sum(1) / gd[:, -1]
    assert (l1 <= 2 * Q.mean(0).double() + 1e-6).all()
    assert l1.max() > 1e-4


def test_effective_probs_are_the_binned_kl_gradient():
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(5, 7, generator=g) * 2).requires_grad_(True)
    t = torch.randn(5, 2, 7, generator=g) * 3
    kept = torch.zeros(5, 2, 7, dtype=torch.bool).scatter_(-1, torch.topk(t, 3, -1).indices, True)
    kl = kl_per_sample(s, t, T=2.0, kept=kept)  # [B, K]
    for k in range(2):
        (grad,) = torch.autograd.grad(kl[:, k].sum(), s, retain_graph=True)
        ref = 2.0 * (torch.softmax(s / 2.0, -1) - effective_teacher_probs(s, t, T=2.0, kept=kept)[:, k])
        assert torch.allclose(grad, ref.detach(), atol=1e-5)


# -- extreme regimes -----------------------------------------------------------------------------
def test_empty_tail_and_one_hot_teachers_stay_finite():
    """A tail whose mass underflows even in float64 (margins of 1e4): no NaN in loss or gradients."""
    z = torch.tensor([[[1e4, 0.0, -1e4, 5.0], [0.0, 3e3, 1.0, 2.0]]])  # [1, 2, 4]
    labels = torch.tensor([0])
    spec = topk.LogitsSpec("topk", 2, (T,))
    arrays = topk.compute(z, labels, spec)
    assert torch.isfinite(arrays["lse"]).all() and torch.isfinite(arrays["log_tail"]).all()
    logits, kept = topk.rebuild(arrays["index"], arrays["values"], arrays["lse"][..., 0], arrays["log_tail"][..., 0], 4, T)
    assert torch.isfinite(logits).all()
    s = torch.zeros(1, 4, requires_grad=True)
    kd, w = camkd_kd_loss(s, logits, labels, T=T, kept=kept, ce=arrays["ce"])
    kd.backward()
    assert torch.isfinite(kd) and torch.isfinite(s.grad).all()
    assert torch.allclose(kd, camkd_kd_loss(s.detach(), z, labels, T=T)[0], rtol=1e-5)  # the tail held nothing
    # EBKD: entropies that are exactly 0 (log -inf) for every teacher: the reference's 0/0 taken as 1/K
    ent = arrays["log_entropy"]
    assert torch.isinf(ent).all()
    assert torch.allclose(ebkd_weights(logits, ent), torch.full((1, 2), 0.5))


def test_log_entropy_weights_equal_the_dense_ones_where_float32_underflows():
    """EBKD's ratio from stored log-entropies equals the float64 dense computation, also at margins where
    the entropies themselves underflow float32 (a log keeps them)."""
    for margin in (2.0, 30.0, 90.0, 200.0):
        z = torch.zeros(3, 3, 10)
        z[:, 0, 0] = margin
        z[:, 1, 1] = margin / 2
        z[:, 2, 2] = margin / 3
        ref = ebkd_weights(z)
        got = ebkd_weights(z, teacher_entropies(z).log().float())
        assert torch.allclose(got, ref, atol=1e-6), (margin, got, ref)


def test_single_teacher_and_k1(tmp_path, specs):
    out = tmp_path / "k1.zarr"
    cache_teachers(CacheConfig(teachers=specs[:1], out=str(out), logits="topk:1", **BASE))
    tk, labels = _batch(out)
    assert tk.logits.shape == (64, 1, C) and tk.kept.sum(-1).eq(1).all()
    for name in LOGIT_METHODS:
        m = create_method(name, num_classes=C, num_teachers=1, student_feat_shapes=[], teacher_feat_shapes={},
                          loss=LossConfig(beta=0.0, kd_T=T))
        losses, diag = m(StudentOut(logits=_student()), tk, labels, epoch=1)
        assert torch.isfinite(losses["kd"]) and torch.allclose(diag["teacher_weights"], torch.ones(1))


def test_binned_kl_equals_full_kl_with_one_class_tail():
    g = torch.Generator().manual_seed(0)
    log_ps = F.log_softmax(torch.randn(4, 6, generator=g), -1)
    log_pt = F.log_softmax(torch.randn(4, 6, generator=g) * 4, -1)
    kept = torch.ones(4, 6, dtype=torch.bool)
    kept[:, 2] = False
    full = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    assert torch.allclose(binned_kl(log_ps, log_pt, kept), full, atol=1e-6)


# -- errors, verify, plan ------------------------------------------------------------------------
def test_distilling_at_an_uncached_temperature_is_a_clear_error(stores):
    with pytest.raises(CamkdError, match=r"--kd-T 4 only, not 2.*--kd-T 2"):
        StoreTeachers(open_store(stores["k2"]), (), torch.device("cpu"), memory_budget_mb=64, temperature=2.0)


def test_ce_runs_from_a_store_whatever_temperatures_it_cached(stores, tmp_path):
    """ce reads no teacher logits: --kd-T is not checked against the store, and ce equals ce from the dense store."""
    from configs import distill_cfg

    from camkd.checkpoint import load_checkpoint
    from camkd.distill import distill

    kw = dict(arch="resnet8", method="ce", epochs=1, batch_size=32, seed=0, deterministic=True, progress=False)
    distill(distill_cfg(cache=str(stores["k2"]), out=str(tmp_path / "k2"), kd_T=2.0, **kw))  # k2 cached T = 4 only
    s = distill(distill_cfg(cache=str(stores["dense"]), out=str(tmp_path / "dense"), **kw))
    assert all("teacher_weights" not in h for h in s["history"])  # ce has no teacher weights to report
    a, b = load_checkpoint(tmp_path / "k2" / "last.pth")["model"], load_checkpoint(tmp_path / "dense" / "last.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_errors_are_one_line(cli, one_error, specs, tmp_path):
    for args, msg in [(["--logits", "topk:10"], "keeps every one of the 10 classes"),
                      (["--logits", "top5"], "is not understood"),
                      (["--kd-T", "2"], "--kd-T is recorded only by a top-k store"),
                      (["--logits", "topk:3", "--kd-T", "-1"], "--kd-T must be positive (each a temperature to distill "
                                                               "at), got -1")]:
        r = cli("cache-teachers", "-t", specs[0], "-d", "synthetic", "--limit", "64", "-V", "1", "--device", "cpu",
                "--out", str(tmp_path / "x.zarr"), "--no-eval", "-q", *args)
        one_error(r, re.escape(msg))
        assert not (tmp_path / "x.zarr").exists()


def test_verify_recomputes_a_topk_store_and_finds_a_damaged_index(specs, tmp_path, stores):
    out = tmp_path / "k5.zarr"
    cache_teachers(CacheConfig(teachers=specs, out=str(out), logits="topk:5", **BASE))
    ok = cache_verify(str(out), teachers=specs, sample=16, device="cpu")
    assert ok.ok, ok.lines
    compared = [line.split(":")[0].strip() for line in ok.lines if "largest difference" in line]
    assert len(compared) == len(set(compared)) and any(c.startswith("topk/index") for c in compared), ok.lines
    g = zarr.open_group(str(out), mode="r+")
    idx = np.asarray(g["topk/index"][0])
    idx[:, :, 0] = (idx[:, :, 0] + 1) % C  # every sample's top class now names another class (checksums rewritten)
    g["topk/index"][0] = idx
    bad = cache_verify(str(out), teachers=specs, sample=16, device="cpu")
    assert not bad.ok and any("MISMATCH: topk/index" in line for line in bad.lines), bad.lines


def test_plan_matches_the_written_topk_store(stores):
    from camkd.store.plan import plan_store
    from camkd.store.sizes import array_sizes

    store = open_store(stores["k5"])
    plan = plan_store(n=N, views=2, k=3, num_classes=C, dtype="float32",
                      shapes={"penultimate": store.feature_shapes("penultimate")}, block_rows=store.block_rows,
                      logits=store.logits_spec)
    sizes = array_sizes(store.g)
    for name in (layout.topk_path(a) for a in layout.TOPK):
        assert plan.arrays[name] == sizes[name], (name, plan.arrays[name], sizes[name])


def test_kd_on_a_topk_store_says_its_error_is_unbounded(stores, tmp_path, capsys):
    """One warning line (not an error) for kd on a top-k store of several teachers; avg, bounded, runs silently."""
    from configs import distill_cfg

    from camkd.distill import distill

    kw = dict(arch="resnet8", epochs=1, batch_size=32, progress=False)
    warnings = {}
    for method in ("kd", "avg"):
        distill(distill_cfg(method=method, cache=str(stores["k2"]), out=str(tmp_path / method), **kw))
        warnings[method] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings["avg"] == [] and len(warnings["kd"]) == 1
    assert "kd averages the teachers' logits" in warnings["kd"][0]
    assert "an error not bounded by the tail mass; prefer --method avg or camkd" in warnings["kd"][0]


def test_dense_float16_and_topk_stores_report_the_same_teacher_accuracy(cli, tmp_path):
    """float16 rounds two close logits to a tie: the dense store's argmax takes the first tied class, and the top-k
    store keeps that class first (not float32's larger one), so both report the same accuracy."""
    torch.manual_seed(0)
    m = create_model("resnet8", num_classes=C, in_channels=3)
    with torch.no_grad():  # classes 0 and 1 lead; float32: 1 by 0.001; float16 (a step of 1/64 at 20): mostly tied
        m.fc.weight[1] = m.fc.weight[0]
        m.fc.bias[0], m.fc.bias[1] = 20.0, 20.001
    torch.save({"model": m.state_dict()}, tmp_path / "tie.pth")
    common = ["-t", f"resnet8={tmp_path / 'tie.pth'}", "-d", "synthetic", "--limit", str(N), "-V", "1", "-f", "none",
              "--dtype", "float16", "--no-eval", "--device", "cpu", "-q"]
    dense, k2 = tmp_path / "dense.zarr", tmp_path / "k2.zarr"
    printed = []
    for out, extra in ((dense, []), (k2, ["--logits", "topk:2"])):
        r = cli("cache-teachers", *common, *extra, "--out", out)
        assert r.exit_code == 0, r.output
        printed.append(next(line for line in r.output.splitlines() if line.strip().startswith("view 0:")))
    assert printed[0] == printed[1], printed
    z = open_store(dense).logits(0).numpy()[:, 0]  # [N, C] float16
    assert (z[:, 0] == z[:, 1]).sum() > N // 2 and (z[:, :2].max(-1) > z[:, 2:].max(-1)).all()  # ties, at the top
    kept = np.asarray(zarr.open_group(str(k2), mode="r")["topk/index"][0, :, 0])  # [N, k]
    assert np.array_equal(kept[:, 0], z.argmax(-1)) and np.array_equal(kept[:, 1], 1 - z.argmax(-1))
