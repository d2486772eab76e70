"""The CUDA tier: collected everywhere, skipped without a CUDA device (tests/conftest.py), run by bench/gpu.sh.

What a GPU user relies on, at tiny sizes: the three commands end to end on --device cuda; cached == online on
CUDA with deterministic kernels; torchrun over nccl with one process per GPU equal to one process with as many
micro-batches; --sync-bn; the precision and layout options. The 32-px views CPU == CUDA: tests/test_views.py.
"""

import json
import math
import subprocess

import numpy as np
import pytest
import torch
from configs import StepRecorder, distill_cfg
from helpers import two_teachers
from test_dist import TIMEOUT, VENV_BIN, assert_same_weights, env, reference_store

from camkd.cache import CacheConfig, cache_teachers
from camkd.checkpoint import load_checkpoint
from camkd.distill import distill
from camkd.methods import list_methods

pytestmark = pytest.mark.cuda

N = 128


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def finite_losses(run) -> bool:
    return all(math.isfinite(r["train_loss"]) for r in metrics(run))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two teachers trained one epoch on CUDA (camkd checkpoints)."""
    return two_teachers(tmp_path_factory.mktemp("cuda_teachers"), N, device="cuda")


@pytest.fixture(scope="module")
def store(teachers, tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda_store") / "s.zarr"
    cache_teachers(CacheConfig(teachers=teachers, dataset="synthetic", options={"num_samples": N}, views=2, aug_seed=3,
                               features=["penultimate", "hint:2"], dtype="float32", device="cuda", out=str(path),
                               progress=False))
    return str(path)


def test_the_three_commands_end_to_end(cli, tmp_path):
    """train-teacher, cache-teachers (and cache-verify -t), distill: the CLI on --device cuda."""
    ckpts = []
    for arch in ("resnet8", "resnet14"):
        r = cli("train-teacher", "-m", arch, "-d", "synthetic", "--limit", "256", "--epochs", "2", "--batch-size", "64",
                "--device", "cuda", "-q", "--out", tmp_path / arch)
        assert r.exit_code == 0, r.output
        assert [m["epoch"] for m in metrics(tmp_path / arch)] == [1, 2] and finite_losses(tmp_path / arch)
        ckpts.append(tmp_path / arch / "best.pth")
    store = tmp_path / "s.zarr"
    r = cli("cache-teachers", *[a for c in ckpts for a in ("-t", c)], "-d", "synthetic", "--limit", "256", "-V", "2",
            "--device", "cuda", "-q", "--out", store)
    assert r.exit_code == 0 and "cached 512 sample-views" in r.output, r.output
    r = cli("cache-verify", store, *[a for c in ckpts for a in ("-t", c)], "--device", "cuda")
    assert r.exit_code == 0, r.output
    r = cli("distill", "-m", "resnet8", "-c", store, "--method", "camkd", "--epochs", "2", "--batch-size", "64",
            "--device", "cuda", "-q", "--out", tmp_path / "student")
    assert r.exit_code == 0 and "best top-1" in r.output, r.output
    assert [m["epoch"] for m in metrics(tmp_path / "student")] == [1, 2] and finite_losses(tmp_path / "student")


@pytest.fixture
def no_tf32():
    """TF32 off for convolutions and matmuls during a test (float32 products rounded as float32)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("method", sorted(list_methods()))
def test_cache_equals_online_on_cuda(method, teachers, store, tmp_path, no_tf32):
    """As tests/test_distill.py on the CPU: 2 epochs (every term of every method), step losses within 1e-5 relative.

    Deterministic kernels (--deterministic), and TF32 off: with TF32 (PyTorch's default for convolutions on
    Ampere and later) the teachers' outputs depend on the batch size (cache-teachers' 256, the student's 16) at
    about 1e-3, so the stored and the re-run teachers differ by that much."""
    runs = {}
    for name, kw in (("cached", {}), ("online", {"online": True, "teachers": teachers})):
        rec = StepRecorder()
        distill(distill_cfg(arch="resnet8", method=method, cache=store, epochs=2, batch_size=16, lr=0.02, seed=1,
                            deterministic=True, device="cuda", progress=False, out=str(tmp_path / name), **kw), hooks=rec)
        runs[name] = np.array([s["loss"] for s in rec.table()])
    a, b = runs["cached"], runs["online"]
    assert len(a) == len(b) == 2 * (N // 16)
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-12)
    assert rel.max() <= 1e-5, (method, rel.max(), int(rel.argmax()))
    wa = load_checkpoint(tmp_path / "cached" / "last.pth")["model"]
    wb = load_checkpoint(tmp_path / "online" / "last.pth")["model"]
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-4, atol=1e-5), (method, k)


DET = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # what deterministic cuBLAS needs, set before CUDA starts


def _torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    """`camkd ARGS` under torchrun with ``nproc`` processes (nccl on CUDA)."""
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), "--no-python", str(VENV_BIN / "camkd"),
           *map(str, args)]
    return subprocess.run(cmd, env=env(**DET), capture_output=True, text=True, timeout=TIMEOUT)


def _one_process(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "camkd"), *map(str, args)], env=env(**DET), capture_output=True, text=True,
                          timeout=TIMEOUT)


@pytest.fixture(scope="module")
def ref_store(tmp_path_factory):
    """A float32 store of two seeded reference-format teachers, written on CUDA."""
    return reference_store(tmp_path_factory.mktemp("cuda_dist"), device="cuda")


def test_nccl_ranks_equal_one_process_with_micro_batches(ref_store, tmp_path):
    """torchrun with one process per GPU present (nccl; W = 1 on a one-GPU machine) == one process with W
    micro-batches, CA-MKD, 2 epochs, deterministic kernels: bit for bit with W <= 2 (a sum of two gradients does
    not depend on its order), within float tolerance beyond."""
    w = torch.cuda.device_count()
    base = ["distill", "-m", "resnet8", "-c", ref_store, "--method", "camkd", "--batch-size", str(16 * w), "--lr", "0.05",
            "--epochs", "2", "--seed", "7", "--deterministic", "--device", "cuda", "-q"]
    r = _torchrun(w, *base, "--out", tmp_path / "ranks")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _one_process(*base, "--micro-batches", w, "--out", tmp_path / "one")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["world_size"] for m in metrics(tmp_path / "ranks")] == [w, w]
    if w <= 2:
        assert_same_weights(tmp_path / "ranks" / "last.pth", tmp_path / "one" / "last.pth")
    else:
        a, b = load_checkpoint(tmp_path / "ranks" / "last.pth"), load_checkpoint(tmp_path / "one" / "last.pth")
        for k in a["model"]:
            assert torch.allclose(a["model"][k].float(), b["model"][k].float(), rtol=1e-4, atol=1e-5), k


def test_sync_bn_runs(ref_store, tmp_path):
    """--sync-bn on CUDA: under torchrun with one process per GPU, and in one process (SyncBatchNorm without a
    process group normalizes like BatchNorm)."""
    w = torch.cuda.device_count()
    base = ["distill", "-m", "resnet8", "-c", ref_store, "--method", "kd", "--batch-size", str(16 * w), "--epochs", "2",
            "--device", "cuda", "--sync-bn", "-q"]
    r = _torchrun(w, *base, "--out", tmp_path / "ranks")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["epoch"] for m in metrics(tmp_path / "ranks")] == [1, 2] and finite_losses(tmp_path / "ranks")
    r = _one_process(*base, "--out", tmp_path / "one")
    assert r.returncode == 0, r.stderr[-3000:]
    assert finite_losses(tmp_path / "one")


@pytest.mark.parametrize("options", [["--precision", "bf16"], ["--precision", "fp16"], ["--channels-last"],
                                     ["--precision", "bf16", "--channels-last"]], ids=" ".join)
def test_precision_options_run(options, cli, ref_store, tmp_path):
    """train-teacher, cache-teachers and distill (CA-MKD, from the store and --online) with each option on CUDA:
    they run, their losses are finite, and the runs record the options they ran with."""
    r = cli("train-teacher", "-m", "resnet8", "-d", "synthetic", "--limit", "256", "--epochs", "1", "--batch-size", "64",
            "--device", "cuda", "-q", *options, "--out", tmp_path / "teacher")
    assert r.exit_code == 0, r.output
    assert finite_losses(tmp_path / "teacher")
    r = cli("cache-teachers", "-t", tmp_path / "teacher" / "best.pth", "-d", "synthetic", "--limit", "256", "-V", "2",
            "--device", "cuda", "-q", *options, "--out", tmp_path / "s.zarr")
    assert r.exit_code == 0, r.output
    precision = options[options.index("--precision") + 1] if "--precision" in options else "fp32"
    for name, extra in (("cached", []), ("online", ["--online", "-t", tmp_path / "teacher" / "best.pth"])):
        r = cli("distill", "-m", "resnet8", "-c", tmp_path / "s.zarr", "--method", "camkd", "--epochs", "2", "--batch-size",
                "32", "--lr", "0.05", "--device", "cuda", "-q", *options, *extra, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
        assert [m["epoch"] for m in metrics(tmp_path / name)] == [1, 2] and finite_losses(tmp_path / name), name
        run = load_checkpoint(tmp_path / name / "last.pth")["meta"]["options"]["run"]
        assert (run["precision"], run["channels_last"]) == (precision, "--channels-last" in options), run


@pytest.mark.parametrize("precision,channels_last", [("fp32", False), ("bf16", True), ("fp16", False)])
def test_plain_loop_on_cuda(precision, channels_last):
    """bench speed's plain PyTorch loop at each precision on the GPU (fp16 is too slow on a CPU to test there)."""
    from camkd.bench.plain import plain_images_per_s
    from camkd.config import OptimConfig
    from camkd.data import load_dataset

    train = load_dataset("synthetic", "train", num_samples=256, num_classes=10).to(torch.device("cuda"))
    rates = plain_images_per_s("resnet8", train, batch_size=64, optim=OptimConfig(lr=0.01), precision=precision,
                               channels_last=channels_last)
    assert len(rates) == 2 and all(math.isfinite(v) and v > 0 for v in rates)


def test_bench_protocol_on_cuda(cli, tmp_path):
    """`bench protocol --device cuda` at a tiny size: the result names the GPU it ran on."""
    r = cli("bench", "protocol", "--samples", "256", "--test-samples", "64", "--student", "resnet8", "--teacher-arch",
            "resnet8", "-K", "2", "--steps", "2", "--device", "cuda", "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    whole = json.loads((tmp_path / "p.json").read_text())
    assert whole["device"]["type"] == "cuda" and whole["device"]["gpu"] == torch.cuda.get_device_name(0)
    assert r.output.startswith(f"Device: GPU {torch.cuda.get_device_name(0)} (host CPU ")

