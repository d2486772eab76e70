"""--precision, --channels-last and --compile on the CPU: bf16 near fp32, cached == online under bf16, bit-identical
resumes in bf16 and fp16, the layout and compiled runs equal to the default within float tolerance, the store's
recorded precision, bad input. The fp32 default's exactness is what every other test of the loop already checks."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from configs import StepRecorder, distill_cfg, train_cfg

from camkd.cache import CacheConfig, cache_teachers
from camkd.checkpoint import load_checkpoint
from camkd.data.norm import Normalization, normalize
from camkd.distill import distill
from camkd.errors import CamkdError
from camkd.precision import Precision, _check_autocast, _unsupported
from camkd.report import report
from camkd.store import open_store
from camkd.store.info import cache_info
from camkd.train import train_teacher

N = 64
# 8 px images: fp16 convolutions have no fast CPU kernel (their backward is ~100x slower than bf16's at 32 px)
TINY = dict(arch="resnet8", dataset="synthetic", options={"num_samples": N, "image_size": 8}, batch_size=16, lr=0.05,
            progress=False, deterministic=True)


def teacher_run(tmp_path, name, **kw):
    rec = StepRecorder(max_steps=kw.pop("max_steps", None))
    s = train_teacher(train_cfg(**{**TINY, "epochs": 1, **kw}, out=str(tmp_path / name)), hooks=rec)
    s["steps"] = rec.table()
    return s


def losses(s) -> np.ndarray:
    return np.array([step["loss"] for step in s["steps"]])


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_bf16_training_stays_near_fp32(tmp_path):
    """Same init, same batches. lr 0: every step is the same weights, so the losses differ by the bf16 forward alone;
    bf16 keeps 8 significant bits (2^-9 = 0.2% relative rounding per value), and through resnet8's ~10 rounded layers
    into a mean loss the errors mostly average out (measured 6e-4): at most 5e-3, and not 0 (autocast ran). One step
    on the first batch: the update (gradient, momentum-free first step) points as fp32's does, cosine >= 0.95
    (measured 0.99; elementwise, small gradient entries are sums with cancellation, so their relative error is large
    and a norm bound would be loose). Longer trajectories are not compared: on 64 samples they diverge chaotically."""
    kw = dict(epochs=2, lr=0.0)
    fp32, bf16 = teacher_run(tmp_path, "fp32", **kw), teacher_run(tmp_path, "bf16", precision="bf16", **kw)
    a, b = losses(fp32), losses(bf16)
    rel = np.abs(a - b) / np.abs(a)
    assert len(a) == len(b) == 2 * N // 16
    assert 0 < rel.max() <= 5e-3, rel
    w0 = weights(tmp_path / "fp32" / "last.pth")  # lr 0: still the initial weights
    for name, p in (("fp32_1", "fp32"), ("bf16_1", "bf16")):
        teacher_run(tmp_path, name, max_steps=1, precision=p)
    keys = [k for k, v in w0.items() if k.endswith("weight") and v.ndim > 1]  # conv and linear weights
    d32, d16 = (torch.cat([(weights(tmp_path / name / "last.pth")[k] - w0[k]).flatten() for k in keys])
                for name in ("fp32_1", "bf16_1"))
    cos = torch.nn.functional.cosine_similarity(d32, d16, dim=0)
    assert 0.95 <= cos < 1.0, cos


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resumed_run_continues_bit_identically(precision, tmp_path):
    full = teacher_run(tmp_path, "full", epochs=3, precision=precision)
    for epochs in (1, 3):  # interrupted after epoch 1, resumed to 3
        resumed = teacher_run(tmp_path, "part", epochs=epochs, precision=precision, resume=epochs > 1)
    a, b = load_checkpoint(tmp_path / "full" / "last.pth"), load_checkpoint(tmp_path / "part" / "last.pth")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert full["last_top1"] == resumed["last_top1"]
    assert np.array_equal(losses(full)[-len(losses(resumed)):], losses(resumed))
    if precision == "fp16":  # the scaler's state restored: its scale (halved by overflows) or its count of good steps
        sc = a["scaler"]  # (which doubles the scale every 2000) could only be the full run's from the checkpoint
        assert sc == b["scaler"] and (sc["scale"] < 2.0**16 or sc["_growth_tracker"] > len(losses(resumed))), sc
    else:
        assert "scaler" not in a


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])  # ~20 s each
def test_two_ranks_equal_one_process_with_two_micro_batches(precision, tmp_path):
    """The loop's W ranks == W micro-batches promise holds under autocast too, bit for bit: its weight-cast cache is
    off, so each micro-batch casts the weights and their gradients reach the float32 weights as each rank's do."""
    base = ["train-teacher", "-m", "resnet8", "-d", "synthetic", "--limit", "64", "--image-size", "8", "--batch-size",
            "16", "--epochs", "2", "--device", "cpu", "-q", "--deterministic", "--precision", precision]
    bin_ = Path(sys.executable).parent
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ranks = subprocess.run([str(bin_ / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
                            str(bin_ / "camkd"), *base, "--out", str(tmp_path / "ranks")],
                           env=env, capture_output=True, text=True, timeout=240)
    assert ranks.returncode == 0, ranks.stderr[-2000:]
    one = subprocess.run([str(bin_ / "camkd"), *base, "--micro-batches", "2", "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = (load_checkpoint(tmp_path / name / "last.pth") for name in ("ranks", "one"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a.get("scaler") == b.get("scaler")


def test_channels_last_equals_the_default_layout(tmp_path):
    """The same math in other kernels: equal within float32 rounding compounded over 8 steps."""
    default, nhwc = teacher_run(tmp_path, "default", epochs=2), teacher_run(tmp_path, "nhwc", epochs=2, channels_last=True)
    a, b = losses(default), losses(nhwc)
    assert np.allclose(a, b, rtol=1e-5, atol=0), np.abs(a - b).max()
    wa, wb = weights(tmp_path / "default" / "last.pth"), weights(tmp_path / "nhwc" / "last.pth")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-4, atol=1e-6), k
    conv = wb["conv1.weight"]  # the checkpoint holds the layout it trained in: channels-last was applied
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


# --- cached == online under bf16, and the store's record of the teachers' precision --------------------------------

@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed, arch in enumerate(("resnet8", "wrn_16_1")):
        train_teacher(train_cfg(**{**TINY, "arch": arch, "epochs": 1, "seed": seed}, out=str(root / arch)))
        paths.append(str(root / arch / "best.pth"))
    return paths


def cache(teachers, path, **kw) -> str:
    cache_teachers(CacheConfig(**{"teachers": teachers, "dataset": "synthetic", "options": TINY["options"], "views": 2,
                                  "aug_seed": 3, "features": ["penultimate", "hint:2"], "dtype": "float32",
                                  "batch_size": 64, "out": str(path), "progress": False, **kw}))
    return str(path)


@pytest.fixture(scope="module")
def bf16_store(teachers, tmp_path_factory):
    return cache(teachers, tmp_path_factory.mktemp("stores") / "bf16.zarr", precision="bf16")


def student_run(tmp_path, name, **kw):
    base = dict(arch="resnet8", epochs=2, batch_size=16, lr=0.02, seed=1, deterministic=True, progress=False,
                precision="bf16", out=str(tmp_path / name))
    rec = StepRecorder()
    s = distill(distill_cfg(**{**base, **kw}), hooks=rec)
    s["steps"] = rec.table()
    return s


@pytest.mark.parametrize("method", ["kd", "camkd"])
def test_cache_equals_online_under_bf16(method, teachers, bf16_store, tmp_path):
    """The store's teachers ran in bf16 over batches of 64, the live ones run in bf16 over the training batches of 16:
    the same ops on the same images, so the per-step losses and weights agree within test_distill's fp32 bounds."""
    cached = student_run(tmp_path, "cached", method=method, cache=bf16_store)
    online = student_run(tmp_path, "online", method=method, cache=bf16_store, online=True, teachers=teachers)
    a, b = losses(cached), losses(online)
    assert len(a) == len(b) == 2 * N // 16
    rel = np.abs(a - b) / np.abs(b)
    assert rel.max() <= 1e-5, (method, rel.max())
    wa, wb = weights(tmp_path / "cached" / "last.pth"), weights(tmp_path / "online" / "last.pth")
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-4, atol=1e-5), (method, k)
    rows = report([tmp_path / "cached", tmp_path / "online"])["runs"]  # a report names the precision beside the method
    assert sorted(r["method"] for r in rows) == sorted([f"{method} [bf16]", f"{method} (online) [bf16]"])


@pytest.mark.slow
def test_compile_equals_eager(teachers, tmp_path):
    """torch.compile (inductor) of the student and of CA-MKD's embeddings: the same numbers as eager within float32
    tolerance (inductor fuses and reorders float arithmetic), and checkpoints with the modules' own keys (no
    _orig_mod.). kd trains 8 steps (the compiled forward and backward); CA-MKD runs at lr 0, because its feature
    term (beta 50, from epoch 2) amplifies any float rounding over a few steps (channels-last diverges as much),
    so its compiled embeddings are compared step by step on the same weights."""
    store = cache(teachers, tmp_path / "fp32.zarr", features=["penultimate"])
    for method, lr, rtol in (("kd", 0.02, 1e-4), ("camkd", 0.0, 1e-5)):
        kw = dict(method=method, cache=store, precision="fp32", lr=lr)
        eager = student_run(tmp_path, f"{method}_eager", **kw)
        torch._dynamo.utils.counters.clear()  # a fresh count of the graphs dynamo captures: the compiled run did compile
        compiled = student_run(tmp_path, f"{method}_compiled", compile=True, **kw)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, method
        a, b = losses(eager), losses(compiled)
        assert len(a) == len(b) == 2 * N // 16
        assert np.allclose(a, b, rtol=rtol, atol=0), (method, np.abs(a - b).max())
        ca, cb = (load_checkpoint(tmp_path / f"{method}_{mode}" / "last.pth") for mode in ("eager", "compiled"))
        for part in ("model", "method"):
            assert ca[part].keys() == cb[part].keys(), (method, part)
            for k in ca[part]:
                assert torch.allclose(ca[part][k].float(), cb[part][k].float(), rtol=1e-4, atol=1e-6), (method, part, k)
    assert any(k.startswith("embeds.") for k in cb["method"])


def test_store_records_the_teachers_precision(teachers, bf16_store, tmp_path):
    store = open_store(bf16_store)
    assert store.attrs["teacher_precision"] == "bf16" and store.attrs["teacher_channels_last"] is False
    fp32 = open_store(cache(teachers, tmp_path / "fp32.zarr"))
    assert fp32.attrs["teacher_precision"] == "fp32"
    a, b = store.logits(0, torch.device("cpu")), fp32.logits(0, torch.device("cpu"))
    assert not torch.equal(a, b) and torch.allclose(a, b, rtol=0.05, atol=0.05)  # bf16 ran, and near fp32
    assert "teachers   ran in bf16 (--precision)" in cache_info(bf16_store).splitlines()
    with pytest.raises(CamkdError, match=r"made differently: --precision bf16 in the store, fp32 now"):
        cache(teachers, bf16_store, views=3)
    cache(teachers, tmp_path / "fp32.zarr", views=3, channels_last=True)  # the layout may change: extended


def test_a_store_from_before_the_option_is_fp32(teachers, tmp_path):
    """A store whose attrs hold no teacher_precision (made before it was recorded) continues as fp32 and refuses bf16."""
    import zarr

    path = cache(teachers, tmp_path / "old.zarr", views=1)
    g = zarr.open_group(path, mode="r+")
    attrs = dict(g.attrs["camkd"])
    del attrs["teacher_precision"], attrs["teacher_channels_last"]
    g.attrs["camkd"] = attrs
    with pytest.raises(CamkdError, match=r"--precision fp32 in the store, bf16 now"):
        cache(teachers, path, views=2, precision="bf16")
    cache(teachers, path, views=2)
    assert open_store(path).views == 2


# --- the parts ------------------------------------------------------------------------------------------------------

def test_fp16_step_never_reads_the_host(monkeypatch):
    """fp16's scaled step (scale, backward, fused SGD with the scaler's overflow flag, update) stays on the device,
    as the fp32 step does."""
    p = Precision.of("fp16", torch.device("cpu"))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 6, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=True)
    scaler = p.scaler()

    def refuse(*args, **kwargs):
        raise AssertionError("host read on the step path")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for _ in range(2):
        with p.autocast():
            loss = model(torch.randn(4, 3, 6, 6)).float().square().mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def test_unsupported_autocast_dtype_is_one_error():
    with pytest.raises(CamkdError, match=r"--precision fp32x is not supported on cpu \(.*autocast"):
        _check_autocast("cpu", "fp32x", torch.float32)  # CPU autocast takes bf16 and fp16 only


def test_an_autocast_that_raises_is_one_error():
    """torch.autocast raises (not warns) for some devices: bf16 on a GPU without it (a RuntimeError), a backend without
    AMP (an AssertionError). On the CPU the second is real: PyTorch's unregistered privateuse1 backend, whose autocast
    is "available" and then refuses; the check turns it into one line naming the device and what to use instead."""
    with pytest.raises(CamkdError) as e:
        _check_autocast("privateuseone", "bf16", torch.bfloat16)
    line = str(e.value)
    assert "\n" not in line, line
    assert line.startswith("--precision bf16 is not supported on privateuseone (Tried to use AMP with the `privateuseone` "
                           "backend"), line
    assert line.endswith("; use --precision fp16 or fp32"), line


def test_a_gpu_without_bf16_is_named_in_one_line():
    """The refusal autocast's RuntimeError becomes on a GPU without bf16 (torch 2.14's message): its first sentence, no
    "switch dtype", and the precisions to use instead; fp16's names bf16."""
    why = "Current CUDA Device does not support bfloat16. Please switch dtype to float16."
    assert str(_unsupported("bf16", torch.device("cpu"), why)) == (
        "--precision bf16 is not supported on cpu (Current CUDA Device does not support bfloat16); use --precision fp16 "
        "or fp32")
    assert str(_unsupported("fp16", torch.device("cpu"), "")) == "--precision fp16 is not supported on cpu; use --precision bf16 or fp32"


def test_normalize_tensors_are_made_once_and_serve_training():
    """The mean/std are made once per (normalization, device), also when first asked for under inference mode."""
    norm = Normalization((0.25, 0.5, 0.75), (0.5, 0.25, 0.125))
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    with torch.inference_mode():
        first = normalize(images, norm)
    w = torch.ones(3, 1, 1, requires_grad=True)
    (normalize(images, norm) * w).sum().backward()  # no 'inference tensor' error: the cached ones are ordinary
    from camkd.data.norm import _norm_tensors

    hits = _norm_tensors.cache_info().hits
    assert torch.equal(normalize(images, Normalization((0.25, 0.5, 0.75), (0.5, 0.25, 0.125))), first)
    assert _norm_tensors.cache_info().hits == hits + 1


# --- the command line -----------------------------------------------------------------------------------------------

def cli_args(out, *extra):
    return ["train-teacher", "-m", "resnet8", "-d", "synthetic", "--limit", "32", "--batch-size", "16", "--device", "cpu",
            "-q", "--out", out, *extra]


@pytest.mark.parametrize("command", ["train-teacher", "distill", "cache-teachers"])
def test_unknown_precision_is_one_error(command, cli, one_error, tmp_path):
    args = {"train-teacher": cli_args(tmp_path / "r")[1:],
            "distill": ["-m", "resnet8", "--cache", str(tmp_path / "s.zarr")],
            "cache-teachers": ["-t", str(tmp_path / "t.pth"), "-d", "synthetic", "-V", "1"]}[command]
    one_error(cli(command, *args, "--precision", "fp8"), r"--precision.*'fp8'.*fp32.*bf16.*fp16")


def test_resume_with_another_precision_is_one_error(cli, one_error, tmp_path):
    out = tmp_path / "r"
    assert cli(*cli_args(out, "--epochs", "1", "--precision", "bf16")).exit_code == 0
    one_error(cli(*cli_args(out, "--epochs", "2", "--resume")),
              r"--resume: .*last.pth was made with --precision bf16, this run has --precision fp32")
    r = cli(*cli_args(out, "--epochs", "2", "--resume", "--precision", "bf16", "--channels-last"))  # the layout may change
    assert r.exit_code == 0, r.output


def test_a_checkpoint_from_before_the_option_resumes_as_fp32(cli, one_error, tmp_path):
    out = tmp_path / "r"
    assert cli(*cli_args(out, "--epochs", "1")).exit_code == 0
    ckpt = torch.load(out / "last.pth", weights_only=False)
    del ckpt["meta"]["options"]["run"]["precision"]  # as a checkpoint written before --precision existed
    torch.save(ckpt, out / "last.pth")
    one_error(cli(*cli_args(out, "--epochs", "2", "--resume", "--precision", "bf16")),
              r"--resume: .*last.pth was made with --precision fp32, this run has --precision bf16")
    r = cli(*cli_args(out, "--epochs", "2", "--resume"))
    assert r.exit_code == 0, r.output


def test_compile_without_a_compiler_is_one_error(cli, one_error, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, clang++ or c++ on it
    monkeypatch.delenv("CXX", raising=False)
    one_error(cli(*cli_args(tmp_path / "r", "--epochs", "1", "--compile")), r"--compile on the CPU needs a C\+\+ compiler")
    assert not (tmp_path / "r").exists()
