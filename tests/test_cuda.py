"""The CUDA tier: collected everywhere, skipped without a CUDA device (tests/conftest.py), run by bench/gpu.sh.

What a GPU user relies on, at tiny sizes: the three commands end to end on --device cuda; cached == online on
CUDA with deterministic kernels; cache-verify of a store made in TF32; torchrun over nccl with two processes (one
per GPU) equal to one process with two micro-batches, and --sync-bn normalizing over both (both need 2 GPUs: with
one, torchrun makes no process group, so they are skipped as not checked); the precision and layout options. The
32-px views CPU == CUDA: tests/test_views.py.

TF32 is off for everything this module builds in its own process (``no_tf32``, module-scoped and autouse, so it is
set before the teachers and stores are made), and in the processes it starts (NVIDIA_TF32_OVERRIDE=0).
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

from camkd.cache import CacheConfig, cache_teachers, cache_verify
from camkd.checkpoint import load_checkpoint
from camkd.device import set_deterministic
from camkd.distill import distill
from camkd.methods import list_methods
from camkd.store import open_store
from camkd.store.info import cache_info

pytestmark = pytest.mark.cuda

N = 128
TF32_OFF = {"conv": False, "matmul": False}


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    """TF32 off for convolutions and matmuls (float32 products rounded as float32) while this module runs.

    Module-scoped and autouse: pytest sets up a scope's autouse fixtures before the others of that scope, so the
    module-scoped teachers and stores are made without TF32 too (a function-scoped fixture came after them: the cached
    outputs were TF32's, the online run fp32's). The settings are restored after the module."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    old = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    yield
    cudnn.allow_tf32, matmul.allow_tf32 = old


@pytest.fixture(autouse=True)
def same_kernel_settings():
    """Each test starts from the module's settings and leaves them so: a run with --deterministic (set_deterministic)
    changes torch's global flags for the rest of the process, and a test that starts no run (the plain loop, a
    cache_teachers call) would otherwise inherit whichever test ran before it on this xdist worker."""
    cudnn = torch.backends.cudnn
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           cudnn.deterministic, cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(old[0], warn_only=old[1])
    cudnn.deterministic, cudnn.benchmark = old[2], old[3]


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
    """Cached with deterministic kernels (train_teacher left cuDNN autotuning on, whose algorithms differ from the
    online runs' by ~1e-6 relative even without TF32, which the MSE feature terms amplify against 1e-5)."""
    path = tmp_path_factory.mktemp("cuda_store") / "s.zarr"
    set_deterministic(True)
    try:
        cache_teachers(CacheConfig(teachers=teachers, dataset="synthetic", options={"num_samples": N}, views=2,
                                   aug_seed=3, features=["penultimate", "hint:2"], dtype="float32", device="cuda",
                                   out=str(path), progress=False))
    finally:
        set_deterministic(False)  # what train_teacher left (cuDNN autotuning): the tests set their own
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


@pytest.mark.parametrize("method", sorted(list_methods()))
def test_cache_equals_online_on_cuda(method, teachers, store, tmp_path):
    """As tests/test_distill.py on the CPU: 2 epochs (every term of every method), step losses within 1e-5 relative.

    Deterministic kernels (--deterministic), and TF32 off: with TF32 (PyTorch's default for convolutions on
    Ampere and later) the teachers' outputs depend on the batch size (cache-teachers' 256, the student's 16) at
    about 1e-3, so the stored and the re-run teachers differ by that much. The store's own record says it was made
    without TF32 (the module's ``no_tf32`` came before the ``store`` fixture)."""
    assert open_store(store).description.teacher_tf32 == TF32_OFF
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


def test_cache_verify_holds_a_tf32_store(teachers, tmp_path):
    """A float32 store made with TF32 on (PyTorch's default for convolutions; here matmuls too) records it, cache-info
    shows it, and cache-verify -t passes it: recomputed without TF32 (this module's setting) and with it, at another
    batch size than the store's, the differences are TF32's rounding, which the recorded setting lets the tolerance
    hold (float32's own 1e-4 would call a healthy store damaged)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    path = tmp_path / "tf32.zarr"
    cudnn.allow_tf32 = matmul.allow_tf32 = True
    try:
        cache_teachers(CacheConfig(teachers=teachers, dataset="synthetic", options={"num_samples": N}, views=2, aug_seed=3,
                                   features=["penultimate", "hint:2"], dtype="float32", device="cuda", out=str(path),
                                   batch_size=128, progress=False))
        assert open_store(path).description.teacher_tf32 == {"conv": True, "matmul": True}
        assert "tf32       on for convolutions and matmuls" in cache_info(path)
        here_too = cache_verify(path, teachers, sample=N, device="cuda")  # this machine in TF32 as well
    finally:
        cudnn.allow_tf32 = matmul.allow_tf32 = False
    assert here_too.ok, here_too.lines
    rep = cache_verify(path, teachers, sample=N, device="cuda")  # TF32 off here: the store's record widens the bound
    assert rep.ok, rep.lines
    assert any(line.startswith("TF32: the store's teachers ran float32") for line in rep.lines), rep.lines


DET = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # what deterministic cuBLAS needs, set before CUDA starts
       "NVIDIA_TF32_OVERRIDE": "0"}  # cuBLAS and cuDNN without TF32 in the processes started here, as in this one
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="not checked: needs 2 GPUs (two nccl ranks, one per "
                              "GPU; with one GPU torchrun runs one process, which makes no process group)")


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


@TWO_GPUS
def test_nccl_ranks_equal_one_process_with_micro_batches(ref_store, tmp_path):
    """torchrun with 2 processes (nccl, one GPU each) == one process with 2 micro-batches, CA-MKD, 2 epochs,
    deterministic kernels: bit for bit (a sum of two gradients does not depend on its order), as tests/test_dist.py
    shows with gloo on the CPU."""
    base = ["distill", "-m", "resnet8", "-c", ref_store, "--method", "camkd", "--batch-size", "32", "--lr", "0.05",
            "--epochs", "2", "--seed", "7", "--deterministic", "--device", "cuda", "-q"]
    r = _torchrun(2, *base, "--out", tmp_path / "ranks")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _one_process(*base, "--micro-batches", 2, "--out", tmp_path / "one")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["world_size"] for m in metrics(tmp_path / "ranks")] == [2, 2]
    assert_same_weights(tmp_path / "ranks" / "last.pth", tmp_path / "one" / "last.pth")


def _largest_difference(a, b) -> float:
    """The largest absolute difference between two checkpoints' student weights and buffers."""
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].is_floating_point())


@TWO_GPUS
def test_sync_bn_normalizes_over_both_ranks(ref_store, tmp_path):
    """--sync-bn under torchrun with 2 processes (nccl): each BatchNorm normalizes over the whole global batch, so the
    weights are those of one process training on the whole batch (SyncBatchNorm without a process group is
    BatchNorm), within float tolerance (other reductions, nondeterministic kernels), and more than ten times closer to
    them than one process with 2 micro-batches is: what 2 ranks give without --sync-bn, each rank normalizing its own
    half."""
    base = ["distill", "-m", "resnet8", "-c", ref_store, "--method", "kd", "--batch-size", "32", "--lr", "0.05",
            "--epochs", "2", "--seed", "7", "--device", "cuda", "-q"]
    r = _torchrun(2, *base, "--sync-bn", "--out", tmp_path / "ranks")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _one_process(*base, "--sync-bn", "--out", tmp_path / "whole")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _one_process(*base, "--micro-batches", 2, "--out", tmp_path / "halves")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["world_size"] for m in metrics(tmp_path / "ranks")] == [2, 2] and finite_losses(tmp_path / "ranks")
    synced = _largest_difference(tmp_path / "ranks" / "last.pth", tmp_path / "whole" / "last.pth")
    halves = _largest_difference(tmp_path / "halves" / "last.pth", tmp_path / "whole" / "last.pth")
    assert synced * 10 < halves, (synced, halves)


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
    device = f"Device: GPU {torch.cuda.get_device_name(0)} (host CPU "
    assert (tmp_path / "p.md").read_text().startswith(device)
    # printed too, after the log lines ("[protocol] caching ...") that stderr mixes into the output
    assert any(line.startswith(device) for line in r.output.splitlines()), r.output

