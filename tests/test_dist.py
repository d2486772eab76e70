"""Many processes: real torch.distributed (gloo) ranks launched by torchrun, against one process.

The promise: W ranks equal one process that splits each global batch into W BatchNorm
micro-batches, bit for bit, for every method; bad input stops every rank with one line and
exit code 2, and a failure on one rank only stops the others without a hang.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from camkd.cache import CacheConfig, cache_teachers
from camkd.checkpoint import load_checkpoint
from camkd.methods import list_methods
from camkd.models import create_model

VENV_BIN = Path(sys.executable).parent
WORKERS = Path(__file__).parent / "workers"
TIMEOUT = 240


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    e.update(extra)
    return e


def torchrun(*args, cwd=None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def seeded_teachers(work: Path, archs: list[str], *, seed: int) -> list[str]:
    """Untrained, seeded teachers saved as reference checkpoints; returns ARCH=PATH specs."""
    specs = []
    for k, arch in enumerate(archs):
        torch.manual_seed(seed + k)
        torch.save({"model": create_model(arch, num_classes=10, in_channels=3).state_dict()}, work / f"t{k}.pth")
        specs.append(f"{arch}={work / f't{k}.pth'}")
    return specs


def reference_store(work: Path, *, device: str) -> Path:
    """A float32 store (2 views, penultimate and hint 2) of two seeded reference-format teachers, written on ``device``."""
    specs = seeded_teachers(work, ["resnet8", "resnet14"], seed=200)
    path = work / "s.zarr"
    cache_teachers(CacheConfig(teachers=specs, dataset="synthetic", limit=128, views=2, aug_seed=3,
                               features=["penultimate", "hint:2"], dtype="float32", out=str(path), device=device,
                               progress=False, evaluate=False))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return reference_store(tmp_path_factory.mktemp("dist"), device="cpu")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a), load_checkpoint(b)
    for part in ("model", "method"):
        assert wa[part].keys() == wb[part].keys()
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), (a, part, k)


@pytest.fixture(scope="module")
def topk_store(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist_topk")
    specs = seeded_teachers(work, ["resnet8", "resnet14"], seed=200)
    path = work / "k3.zarr"
    cache_teachers(CacheConfig(teachers=specs, dataset="synthetic", limit=128, views=2, aug_seed=3, features=["penultimate"],
                               dtype="float32", out=str(path), device="cpu", progress=False, evaluate=False,
                               logits="topk:3"))
    return path


def one_process(*args, cwd=None) -> subprocess.CompletedProcess:
    """The same command in one process (no torch.distributed)."""
    return subprocess.run(list(map(str, args)), cwd=cwd, env=env(), capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_two_micro_batches(store, topk_store, tmp_path):
    """2 epochs on 2 ranks and in one process with 2 micro-batches: the same weights, bit for bit.

    Every method from the dense store; from the top-k store (kept classes, exact CE and entropies sliced
    with the batch like the logits) AEKD (batch statistics summed over the slices) and CA-MKD (the stored
    cross-entropies). One torchrun job runs them all (its start-up is most of the cost on a CPU).
    """
    runs = [f"{m}@{store}" for m in list_methods()] + [f"{m}@{topk_store}" for m in ("aekd", "camkd")]
    r = torchrun("--no-python", sys.executable, WORKERS / "distill_methods.py", tmp_path / "w2", 1, 2, *runs)
    assert r.returncode == 0, r.stderr[-3000:]
    # camkd's and fitnet's modules join in epoch 2, outside DDP: it never looks for unused parameters, so never notes
    assert "find_unused_parameters" not in r.stderr + r.stdout, r.stderr[-3000:]
    r = one_process(sys.executable, WORKERS / "distill_methods.py", tmp_path / "m2", 2, 2, *runs)
    assert r.returncode == 0, r.stderr[-3000:]
    folders = sorted(p.name for p in (tmp_path / "w2").iterdir())
    assert len(folders) == len(runs) and folders == sorted(p.name for p in (tmp_path / "m2").iterdir())
    for name in folders:
        assert_same_weights(tmp_path / "w2" / name / "last.pth", tmp_path / "m2" / name / "last.pth")


def test_resume_under_another_world_size(store, tmp_path):
    """One epoch on 2 ranks, the second in one process with 2 micro-batches == 2 epochs on 2 ranks.

    The uninterrupted run is the one process with 2 micro-batches (equal to 2 ranks, bit for bit: the test above).
    """
    base = ["distill", "-m", "resnet8", "-c", store, "--method", "camkd", "--batch-size", "32", "--lr", "0.05",
            "--seed", "7", "--deterministic", "--device", "cpu", "-q"]
    r = one_process(VENV_BIN / "camkd", *base, "--epochs", "2", "--micro-batches", "2", "--out", tmp_path / "full")
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun("--no-python", VENV_BIN / "camkd", *base, "--epochs", "1", "--out", tmp_path / "part")
    assert r.returncode == 0, r.stderr[-3000:]
    r = one_process(VENV_BIN / "camkd", *base, "--epochs", "2", "--micro-batches", "2", "--resume", "--out", tmp_path / "part")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(tmp_path / "full" / "last.pth", tmp_path / "part" / "last.pth")
    assert r.stdout.count("best top-1") == 1


def test_bad_input_stops_every_rank_with_one_line(store, tmp_path):
    r = torchrun("--no-python", VENV_BIN / "camkd", "distill", "-m", "resnet9", "-c", store, "--out", tmp_path / "o", timeout=60)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("unknown arch 'resnet9'" in e for e in errors), r.stderr[-2000:]
    assert "exitcode  : 2" in r.stderr and "Traceback" not in r.stderr.split("error: ")[0]
    assert not (tmp_path / "o").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# camkd's entry point, and at exit (atexit runs before the interpreter finalizes) a look at the process groups made:
# each must have been freed by then, which joins its gloo worker threads. A group left alive keeps them running into
# the interpreter's finalization, where one still releasing the last collective's tensor (that takes the GIL) ends
# the rank in C++ after its error line: "terminate called without an active exception", SIGABRT (issue 22).
CAMKD_WATCHING_THE_GROUP = """
import atexit, os, sys, weakref
import torch.distributed as td

made, groups = td.init_process_group, []


def init_process_group(*args, **kwargs):
    made(*args, **kwargs)
    groups.append(weakref.ref(td.group.WORLD))


def report():
    threads = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    alive = sum(g() is not None for g in groups)
    print(f"at exit: {len(groups)} process group(s) made, {alive} alive, threads {threads}", file=sys.stderr)


td.init_process_group = init_process_group
atexit.register(report)
from camkd.cli import main
main()
"""


def test_a_file_missing_on_one_rank_stops_both(store, tmp_path):
    """Two ranks started by hand (as srun would), each in its own folder: the store is there for rank 0 only.

    Both stop with exit code 2 and one line, their process group freed before the interpreter exits (no gloo thread
    left to run into its finalization).
    """
    port = _free_port()
    procs = []
    for rank in range(2):
        cwd = tmp_path / f"node{rank}"
        cwd.mkdir()
        if rank == 0:
            (cwd / "s.zarr").symlink_to(store)
        e = env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", CAMKD_WATCHING_THE_GROUP, "distill", "-m", "resnet8", "-c",
                                       "s.zarr", "--epochs", "1", "--batch-size", "32", "--device", "cpu", "-q", "--out", "run"],
                                      cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert "store s.zarr not found" in outs[1][1]
    assert "another rank failed" in outs[0][1] and outs[0][1].count("error: ") == 1
    for _, err in outs:
        at_exit = re.search(r"at exit: (\d+) process group\(s\) made, (\d+) alive, threads (.*)", err)
        assert at_exit and at_exit.group(1, 2) == ("1", "0") and "gloo" not in at_exit.group(3), err[-2000:]
    assert not (tmp_path / "node0" / "run").exists()


# ---- cache-teachers on many ranks ------------------------------------------------------------------

def _cache_args(teachers, out, views):
    return ["cache-teachers", *[a for t in teachers for a in ("-t", t)], "-d", "synthetic", "--limit", "64", "-V",
            str(views), "--dtype", "float32", "--device", "cpu", "-q", "--out", out]


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env_vars = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env_vars:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


@pytest.fixture(scope="module")
def big_teachers(tmp_path_factory):
    """Teachers slow enough on a CPU that a rank can be killed while it writes."""
    work = tmp_path_factory.mktemp("bigteachers")
    specs = seeded_teachers(work, ["resnet32x4", "resnet8"], seed=300)
    one = work / "one.zarr"
    r = subprocess.run([VENV_BIN / "camkd", *_cache_args(specs, one, 4)], env=env(), capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-2000:]
    return specs, one


@pytest.mark.slow
def test_two_rank_store_is_byte_identical_to_one_process(big_teachers, tmp_path):
    specs, one = big_teachers
    r = torchrun("--no-python", VENV_BIN / "camkd", *_cache_args(specs, tmp_path / "two.zarr", 4))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(re.findall(r"^cached \d+ sample-views", r.stdout, flags=re.M)) == 1, r.stdout  # rank 0 alone reports
    assert _tree(tmp_path / "two.zarr") == _tree(one)


@pytest.mark.slow
def test_store_killed_under_two_ranks_resumes_in_one_process(big_teachers, tmp_path):
    specs, one = big_teachers
    out = tmp_path / "killed.zarr"
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python", str(VENV_BIN / "camkd"),
           *map(str, _cache_args(specs, out, 4))]
    run = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    deadline = time.monotonic() + 120
    while not any((out / "progress" / "c").rglob("*")) if (out / "progress" / "c").exists() else True:
        assert time.monotonic() < deadline and run.poll() is None, "no block was written"
        time.sleep(0.05)
    victims = [p for p in _children(run.pid) if _rank_of(p) == 1]
    assert victims, "rank 1 not found"
    os.kill(victims[0], 9)
    run.wait(timeout=60)
    flags = len([p for p in (out / "progress" / "c").rglob("*") if p.is_file()])
    assert run.returncode != 0 and 0 < flags < 4  # really interrupted
    r = subprocess.run([VENV_BIN / "camkd", *_cache_args(specs, out, 4)], env=env(), capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _tree(out) == _tree(one)


@pytest.mark.slow
def test_max_restarts_with_auto_resume_equals_an_uninterrupted_run(store, tmp_path):
    import time

    base = ["distill", "-m", "resnet8", "-c", store, "--method", "avg", "--batch-size", "32", "--lr", "0.05",
            "--seed", "7", "--deterministic", "--device", "cpu", "--epochs", "3"]
    r = one_process(VENV_BIN / "camkd", *base, "--micro-batches", "2", "--out", tmp_path / "full")  # == 2 ranks
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "restarted"
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--no-python",
           str(VENV_BIN / "camkd"), *map(str, base), "--auto-resume", "--out", str(out)]
    run = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "last.pth").exists():
        assert time.monotonic() < deadline and run.poll() is None, "no epoch finished"
        time.sleep(0.02)
    victims = [p for p in _children(run.pid) if _rank_of(p) == 1]
    os.kill(victims[0], 9)
    _, err = run.communicate(timeout=TIMEOUT)
    assert run.returncode == 0, err[-3000:]
    assert "resuming" in err
    assert_same_weights(tmp_path / "full" / "last.pth", out / "last.pth")


def _gone(pid: int) -> bool:
    """The process has exited (a zombie no one has reaped yet counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_workers_stop_when_the_launcher_is_killed(store, tmp_path):
    """kill -9 of torchrun alone: both workers notice within seconds and exit; the run resumes from its checkpoint."""
    import signal
    import time

    base = ["distill", "-m", "resnet8", "-c", store, "--method", "avg", "--batch-size", "32", "--lr", "0.05", "--seed", "7",
            "--device", "cpu", "-q"]
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python", str(VENV_BIN / "camkd"),
           *map(str, base), "--epochs", "500", "--out", str(out)]
    with open(log, "w") as err:
        run = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 120
    while not (out / "last.pth").exists():
        assert time.monotonic() < deadline and run.poll() is None, "no epoch finished"
        time.sleep(0.05)
    workers = [p for p in _children(run.pid) if _rank_of(p) is not None]
    assert len(workers) == 2
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in workers):
        assert time.monotonic() < deadline, "the workers kept running without their launcher"
        time.sleep(0.1)
    assert log.read_text().count("the torchrun launcher") == 2
    done = load_checkpoint(out / "last.pth")["meta"]["epoch"]
    assert done < 500
    r = one_process(VENV_BIN / "camkd", *base, "--epochs", str(done + 1), "--micro-batches", "2", "--resume", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming {out} at epoch {done + 1}" in r.stderr
