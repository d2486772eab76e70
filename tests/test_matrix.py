"""Every method x every precision x {in-memory store, image-folder store}, each through epoch 2 so every loss term runs
(CA-MKD's and FitNet's feature terms join in epoch 2: fp16's fused SGD once crashed there), and each run's
``evaluate`` of ``last.pth`` equal to its own last metrics. Then fp16's momentum buffers: a checkpoint from before
every parameter had one resumes bit-identically, and a first step skipped on overflow leaves them zero.

8 px images throughout: fp16 convolutions have no fast CPU kernel."""

import json

import pytest
import torch
from configs import distill_cfg, train_cfg
from folder_helpers import make_folder

from camkd.cache import CacheConfig, cache_teachers
from camkd.checkpoint import load_checkpoint
from camkd.distill import distill
from camkd.evaluate import evaluate_checkpoint
from camkd.methods import list_methods
from camkd.precision import zero_momentum_buffers
from camkd.train import train_teacher

PRECISIONS = ("fp32", "bf16", "fp16")
METHODS = tuple(m for m in list_methods() if m != "ce")  # ce uses no teacher: its store path is every other's minus one
SIZE = 8
MEMORY = dict(dataset="synthetic", options={"num_samples": 32, "image_size": SIZE})


def _folder_data(root) -> dict:
    return dict(dataset="imagefolder", data_dir=str(root), options={"image_size": SIZE, "workers": 0})


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two resnet8 teachers per kind of data (seeds 0 and 1, one epoch) and their fp32 store of 1 view with the
    layers every method reads (penultimate, FitNet's hint 2)."""
    tmp = tmp_path_factory.mktemp("matrix")
    folder = make_folder(tmp / "folder", train=4, val=2)
    out = {}
    for kind, data in (("memory", MEMORY), ("folder", _folder_data(folder))):
        teachers = []
        for seed in (0, 1):
            path = tmp / kind / f"t{seed}"
            train_teacher(train_cfg(arch="resnet8", **data, epochs=1, batch_size=8, lr=0.05, seed=seed, progress=False,
                                    out=str(path)))
            teachers.append(str(path / "last.pth"))
        store = tmp / kind / "store.zarr"
        cache_teachers(CacheConfig(teachers=teachers, views=1, features=["penultimate", "hint:2"], dtype="float32",
                                   batch_size=16, evaluate=False, out=str(store), progress=False, **data))
        out[kind] = {"store": str(store), "data_dir": str(folder) if kind == "folder" else None}
    return out


def _student(stores, kind, method, precision, out, **kw):
    s = stores[kind]
    data = {"data_dir": s["data_dir"], "options": {"workers": 0}} if s["data_dir"] else {}
    kw = {"epochs": 2, **kw}
    return distill(distill_cfg(arch="resnet8", method=method, cache=s["store"], batch_size=8, lr=0.02, seed=1,
                               deterministic=True, progress=False, precision=precision, out=str(out), **data, **kw))


def _last_metrics(run) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("kind", ["memory", "folder"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_method_through_epoch_2(stores, kind, precision, tmp_path):
    """One test per (data, precision), the methods in a loop: each trains 2 epochs, finite, its weights moved, and
    evaluate gives its last test_top1 / loss (same images at 8 px, same precision)."""
    for method in METHODS:
        out = tmp_path / method
        _student(stores, kind, method, precision, out)
        rec = _last_metrics(out)
        assert rec["epoch"] == 2 and torch.isfinite(torch.tensor(rec["train_loss"])), (method, rec)
        ckpt = load_checkpoint(out / "last.pth")
        assert ckpt["meta"]["options"]["run"]["precision"] == precision
        if method in ("camkd", "fitnet"):  # the late modules trained in epoch 2: their buffers are not all zero
            bufs = [s["momentum_buffer"] for s in ckpt["optimizer"]["state"].values()]
            assert all(b is not None for b in bufs) and len(bufs) == len(ckpt["optimizer"]["param_groups"][0]["params"])
        got = evaluate_checkpoint(out / "last.pth", device="cpu")
        assert (got["epoch"], got["precision"], got["top1"]) == (2, precision, rec["test_top1"]), method
        assert got["loss"] == pytest.approx(rec["test_loss"], rel=1e-6, abs=0), method


@pytest.mark.parametrize("method", ["camkd", "fitnet"])
def test_fp16_checkpoint_from_before_the_buffers_resumes(stores, method, tmp_path):
    """A checkpoint saved after epoch 1 by a camkd before this fix held no momentum buffer for the method's own modules
    (no gradient yet); stripped so, it resumes, and the resumed run equals the uninterrupted one bit for bit."""
    whole = tmp_path / "whole"
    _student(stores, "memory", method, "fp16", whole)
    part = tmp_path / "part"
    _student(stores, "memory", method, "fp16", part, epochs=1)
    ckpt = load_checkpoint(part / "last.pth")
    state = ckpt["optimizer"]["state"]
    late = [i for i, s in state.items() if not s["momentum_buffer"].any()]  # the method's modules: no step taken yet
    n = len(ckpt["optimizer"]["param_groups"][0]["params"])  # the student's parameters, then the method's
    assert late and sorted(late) == list(range(n - len(late), n)), late
    for i in late:
        del state[i]
    torch.save(ckpt, part / "last.pth")
    _student(stores, "memory", method, "fp16", part, resume=True)
    a, b = load_checkpoint(whole / "last.pth"), load_checkpoint(part / "last.pth")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["method"]:
        assert torch.equal(a["method"][k], b["method"][k]), k
    assert a["scaler"] == b["scaler"]


def test_a_first_step_skipped_on_overflow_leaves_zero_buffers():
    """fused SGD under a GradScaler: a first step whose gradients overflow is skipped; the buffers stay zeros, so the
    next step is SGD's own first step (buf = grad), equal to a plain SGD that never saw the skipped one."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))

    def model_and_opt(fused: bool):
        torch.manual_seed(1)
        m = torch.nn.Linear(5, 3)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, **({"fused": True} if fused else {}))
        return m, opt

    m, opt = model_and_opt(True)
    zero_momentum_buffers(opt)
    scaler = torch.amp.GradScaler("cpu")
    for inputs in (torch.full_like(x, float("inf")), x):  # the first batch overflows: step skipped, scale halved
        opt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(m(inputs), y)).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**15  # one overflow seen
    ref, ref_opt = model_and_opt(False)
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    ref_opt.step()
    for p, q in zip(m.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
    for p, q in zip(m.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"], rtol=1e-5, atol=1e-7)


def test_zero_buffers_are_sgds_own_first_step():
    """With dampening 0, a zero buffer is what SGD's first step makes (buf = grad): fp32 runs unchanged bit for bit."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    runs = []
    for zeros in (False, True):
        torch.manual_seed(1)
        m = torch.nn.Linear(5, 3)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
        if zeros:
            zero_momentum_buffers(opt)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        runs.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
