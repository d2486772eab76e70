"""Smoke runs of the speed benchmark at tiny sizes (the accuracy protocols: test_bench_accuracy.py), so the benchmark code cannot rot.

They check the outputs' structure and that every ratio is a finite positive number, not the
targets (speed is measured by the benchmark itself, side by side, never by a timed test).
"""

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from camkd.bench.common import cpu_model, device_info, device_text
from camkd.bench.config import AccuracyConfig, DataBenchConfig, SpeedConfig, StorageConfig
from camkd.bench.stats import paired, paired_text, t_crit_95
from camkd.errors import CamkdError
from camkd.output import output_prefix, write_result

ROOT = Path(__file__).resolve().parents[1]


def finite_positive(x) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


def test_bench_speed_smoke(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever the bench writes outside --out would land here
    out = tmp_path / "results" / "speed.json"
    r = cli("bench", "speed", "--student", "resnet8", "--teacher-arch", "resnet8", "-K", "2", "--samples", "64",
            "--batch-size", "16", "--repeats", "1", "--threads", "1", "--ranks", "2", "--device", "cpu", "--out", out,
            "--method", "avg", "--method", "camkd")  # the two with online rows (--method: tested below)
    assert r.exit_code == 0, r.output
    whole = json.loads(out.read_text())
    assert set(whole["ranks"]) == {"ce", "camkd+features"}
    assert all(finite_positive(v["2"]) for v in whole["ranks"].values())
    res = whole["by_threads"]["1"]
    assert set(res) >= {"cache", "reader", "train_images_per_s", "cached_over_ce", "cached_over_online", "bytes_per_sample_view",
                        "ce_over_plain", "rounds"}
    med = res["train_images_per_s"]
    assert finite_positive(med["plain"]) and res["ce_over_plain"] == pytest.approx(med["ce"] / med["plain"])
    assert [len(v) for v in res["rounds"].values()] == [1, 1] and res["targets"]["ce_over_plain"] == 0.98
    names = {"avg", "camkd(beta=0)", "camkd+features"}
    assert set(res["cached_over_ce"]) == names and set(res["cached_over_online"]) == {"avg", "camkd+features"}
    assert res["cache"]["best_inference_batch"] in (32, 64, 128, 256)
    for v in list(res["cached_over_ce"].values()) + list(res["cached_over_online"].values()) + [res["cache"]["ratio"]]:
        assert finite_positive(v)
    for v in res["reader"].values():
        assert finite_positive(v["samples_per_s"]) and finite_positive(v["MB_per_s"])
    assert set(res["cached_over_limit"]) == {"camkd+features"}  # the one chosen method with parts of its own
    assert finite_positive(med["plain + camkd+features parts"]) and finite_positive(res["cached_over_limit"]["camkd+features"])
    b16, b32 = res["bytes_per_sample_view"]["float16"], res["bytes_per_sample_view"]["float32"]
    assert b32["logits"] > b16["logits"] > 0  # float32 is stored at twice the bytes (plus checksums)
    assert whole["device"] == {"type": "cpu", "cpu": cpu_model(), "threads": [1]}  # measured on this CPU, at 1 thread
    md = out.with_suffix(".md").read_text()
    assert "| ce (the limit) |" in md and "| plain PyTorch loop |" in md and "ce / plain PyTorch loop: **" in md
    assert "| plain loop + camkd+features's own parts |" in md
    assert "camkd+features from the store: **" in md and "of the plain loop with its own parts (the cache's cost)" in md
    assert "Precision fp32, channels-last off (every run)." in md and whole["config"]["precision"] == "fp32"
    assert md.startswith(f"Device: CPU ({cpu_model()}, 1 thread);") and "GPU" not in md
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # nothing but what --out asked for
    assert Image.open(out.with_suffix(".png")).size[0] > 100


def test_bench_writes_nothing_without_out(cli, one_error, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "speed", "--student", "resnet8", "--teacher-arch", "resnet8", "-K", "1", "--samples", "64",
            "--batch-size", "16", "--repeats", "1", "--threads", "1", "--no-online", "--no-ranks", "--device", "cpu"]
    r = cli(*args, "--method", "kd", "--precision", "bf16", "--channels-last")  # ce, the plain loop and kd only
    assert r.exit_code == 0, r.output
    rows = [line.split("|")[1].strip() for line in r.output.splitlines() if line.startswith("| ") and "img" not in line]
    assert rows[:4] == ["variant", "ce (the limit)", "plain PyTorch loop", "kd"] and "avg" not in rows
    assert "Precision bf16, channels-last on (every run)." in r.output
    assert list(tmp_path.iterdir()) == []
    r = cli(*args, "--method", "kdd")
    one_error(r, r"^error: bench speed: unknown method 'kdd'; choose from aekd, avg, camkd")
    one_error(cli(*args, "--precision", "fp8"), r"^error: .*'fp8' is not one of 'fp32', 'bf16', 'fp16'")


@pytest.mark.parametrize("precision,channels_last", [("fp32", False), ("bf16", True)])
def test_plain_loop_times_each_epoch(precision, channels_last):
    """The plain PyTorch loop `bench speed` sets beside ce: one rate per epoch (fp16, slow on a CPU: test_cuda.py)."""
    from camkd.bench.plain import plain_images_per_s
    from camkd.config import OptimConfig
    from camkd.data import load_dataset

    train = load_dataset("synthetic", "train", num_samples=48, num_classes=10)
    rates = plain_images_per_s("resnet8", train, batch_size=16, optim=OptimConfig(lr=0.01), precision=precision,
                               channels_last=channels_last, epochs=2)
    assert len(rates) == 2 and all(finite_positive(v) for v in rates)
    with pytest.raises(CamkdError, match=r"unknown --precision 'fp8'; choose fp32, bf16, fp16"):
        plain_images_per_s("resnet8", train, batch_size=16, optim=OptimConfig(), precision="fp8")


@pytest.mark.parametrize("method", ["camkd", "fitnet"])
def test_plain_loop_with_a_methods_own_parts(method, tmp_path):
    """The limit of a method with trainable parts: the plain loop plus those parts, fed whole views of a tiny store read
    once; one rate per epoch, and the parts trained (epoch 2 runs the feature term)."""
    from camkd.bench.common import random_teachers
    from camkd.bench.plain import own_parts, plain_images_per_s, store_method, teacher_views
    from camkd.cache import CacheConfig, cache_teachers
    from camkd.config import LossConfig, OptimConfig
    from camkd.data import load_dataset
    from camkd.methods import required_layers
    from camkd.store import open_store

    ckpts = random_teachers("resnet8", 2, 10, tmp_path)
    cache_teachers(CacheConfig(teachers=ckpts, dataset="synthetic", options={"num_samples": 48, "num_classes": 10}, views=2,
                               features=["penultimate", "hint:2"], dtype="float16", device="cpu", out=str(tmp_path / "s.zarr"),
                               progress=False, evaluate=False))
    store = open_store(tmp_path / "s.zarr")
    train = load_dataset("synthetic", "train", num_samples=48, num_classes=10)
    parts = store_method(method, LossConfig(), "resnet8", train, store)
    assert own_parts(parts, epoch=2) and not own_parts(parts, epoch=1)  # the feature term is off in epoch 1
    assert not own_parts(store_method("camkd", LossConfig(beta=0.0), "resnet8", train, store))  # no Embeds without it
    views = teacher_views(store, required_layers(method, LossConfig()), torch.device("cpu"))
    assert len(views) == 2 and views[0].logits.dtype == torch.float32 and len(views[0].heads) == 2
    before = [p.detach().clone() for p in parts.parameters()]
    rates = plain_images_per_s("resnet8", train, batch_size=16, optim=OptimConfig(lr=0.01), epochs=2, method=parts,
                               teachers=views)
    assert len(rates) == 2 and all(finite_positive(v) for v in rates)
    assert all(not torch.equal(b, p) for b, p in zip(before, parts.parameters()))  # every part trained
    with pytest.raises(CamkdError, match=r"a method needs its teacher outputs"):
        plain_images_per_s("resnet8", train, batch_size=16, optim=OptimConfig(), method=parts)


def test_the_cli_defaults_are_the_configs(cli, monkeypatch):
    """Each bench command without options runs its config class's defaults (stated once, in camkd/bench/config.py)."""
    import camkd.bench.accuracy
    import camkd.bench.data
    import camkd.bench.speed
    import camkd.bench.storage

    seen = []

    def capture(cfg):
        seen.append(cfg)
        raise CamkdError("captured")

    for module, name in ((camkd.bench.speed, "run_speed"), (camkd.bench.accuracy, "run_accuracy"),
                         (camkd.bench.storage, "run_storage"), (camkd.bench.data, "run_data")):
        monkeypatch.setattr(module, name, capture)
    for command in ("speed", "accuracy", "storage", "data"):
        assert cli("bench", command).output == "error: captured\n"
    assert seen == [SpeedConfig(), AccuracyConfig(progress=True), StorageConfig(), DataBenchConfig()]  # progress: the CLI's unless -q


def test_storage_defaults_are_the_equal_protocols():
    from camkd.config import LossConfig

    acc, sto = AccuracyConfig(), StorageConfig()
    for key in ("root", "teacher_archs", "teacher_epochs", "student", "epochs", "limit", "batch_size", "lr", "dataset",
                "device"):
        assert getattr(sto, key) == getattr(acc, key), key
    assert sto.kd_T == LossConfig().kd_T


def test_paired_statistics():
    p = paired([80.0, 81.0, 82.0], [79.0, 81.0, 80.0])
    assert p["diffs"] == [1.0, 0.0, 2.0] and p["mean"] == 1.0 and p["sd"] == 1.0 and p["n"] == 3
    assert p["threshold"] == pytest.approx(2 / math.sqrt(3)) and p["exceeds"] is False
    q = paired([1.0, 1.1, 0.9], [0.0, 0.0, 0.0])
    assert q["mean"] == pytest.approx(1.0) and q["sd"] == pytest.approx(0.1) and q["exceeds"] is True
    assert p["t"] == pytest.approx(math.sqrt(3)) and p["t_crit_95"] == 4.303 and p["t_test_95"] is False
    assert q["t"] == pytest.approx(10 * math.sqrt(3)) and q["t_test_95"] is True
    # passes the 2-standard-error rule, not the t-test: what n = 3 allows
    r = paired([87.95, 87.05, 87.78], [86.42, 86.27, 86.99])
    assert r["exceeds"] is True and r["t"] == pytest.approx(4.16, abs=0.01) and r["t_test_95"] is False
    assert t_crit_95(12) == 2.228 and t_crit_95(100) == 1.96 and t_crit_95(0) is None
    assert paired([-1.0, -1.1, -0.9], [0.0, 0.0, 0.0])["exceeds"] is True  # either sign
    s = paired([1.0, 2.0, 3.0], [0.5, 1.0, 2.5])  # differences 0.5, 1.0, 0.5: mean 2/3, sd 0.2887 > 2 x 0.2887 / sqrt(3)
    assert abs(s["mean"] - 2 / 3) < 1e-12 and abs(s["sd"] - 0.288675) < 1e-6 and s["exceeds"]
    assert paired_text(s) == "+0.67 +- 0.29 (beyond spread)" and paired_text(None) == "-"
    one = paired([2.0], [1.5])  # one seed: no spread, nothing judged, and valid JSON (no NaN)
    assert one["diffs"] == [0.5] and one["sd"] is None and one["t"] is None and not one["exceeds"] and not one["t_test_95"]
    assert paired_text(one) == "+0.50" and "NaN" not in json.dumps(one)
    with pytest.raises(ValueError, match="the same seeds"):
        paired([1.0], [1.0, 2.0])


def test_a_cpu_figure_never_names_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")  # as on a machine with a GPU
    cpu = device_info("cpu", [1, 2])
    assert cpu == {"type": "cpu", "cpu": cpu_model(), "threads": [1, 2]}
    assert device_text(cpu) == f"CPU ({cpu_model()}, 1 and 2 threads)"
    gpu = device_info(torch.device("cuda"), [4])
    assert gpu["gpu"] == "NVIDIA H100" and device_text(gpu).startswith("GPU NVIDIA H100 (host CPU ")
    assert cpu_model() and "model name" not in cpu_model()


def test_out_is_a_prefix_checked_before_any_work(tmp_path):
    for given in ("r", "r.json", "r.md", "r.png"):
        assert output_prefix(tmp_path / given) == tmp_path / "r"
    assert output_prefix(tmp_path / "run.v2") == tmp_path / "run.v2"  # another suffix is part of the name
    with pytest.raises(CamkdError, match=r"is a folder; give a file name prefix such as .*result"):
        output_prefix(tmp_path)
    (tmp_path / "r.md").mkdir()
    with pytest.raises(CamkdError, match=r"would write .*r\.md, which is a folder"):
        output_prefix(tmp_path / "r")
    (tmp_path / "f").write_text("")
    with pytest.raises(CamkdError, match=r"f is a file, not a folder"):
        output_prefix(tmp_path / "f" / "sub" / "r")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(CamkdError, match=r"cannot write in .*ro; choose a writable path"):
            output_prefix(tmp_path / "ro" / "new" / "r")


def test_write_result_writes_the_three_files(tmp_path):
    from camkd.output import new_figure

    fig, axes = new_figure(1, 1, (3, 2))
    axes[0][0].plot([1, 2], [3, 4])
    paths = write_result({"a": 1}, tmp_path / "deep" / "r", "| t |", fig)
    assert paths == [str(tmp_path / "deep" / f"r{s}") for s in (".json", ".md", ".png")]
    assert json.loads(Path(paths[0]).read_text()) == {"a": 1} and Path(paths[1]).read_text() == "| t |\n"
    assert Image.open(paths[2]).size == (300, 200)


def test_benchmarks_md_states_current_results_only():
    """Every result file in bench/results is a command's output named in BENCHMARKS.md (its --out), with the device
    it ran on; every file BENCHMARKS.md links exists; no commit hashes, no per-commit history."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    results = sorted(p for p in (ROOT / "bench" / "results").iterdir() if p.name != "gpu")  # gpu/: bench/gpu.sh's, below
    prefixes = sorted({p.with_suffix("") for p in results})
    assert results == sorted(f for p in prefixes for f in (p.with_suffix(".json"), p.with_suffix(".md"), p.with_suffix(".png")))
    for prefix in prefixes:
        name = prefix.relative_to(ROOT)
        assert re.search(rf"camkd bench \w+ .*--out {re.escape(str(name))}(\.json)?(?=[\s`]|$)", text, re.M), name
        device = json.loads(prefix.with_suffix(".json").read_text())["device"]
        assert device["type"] == "cpu" and device["cpu"] and device["threads"], name
    for link in re.findall(r"\]\((bench/[^)]+)\)", text):
        assert (ROOT / link).exists(), link
    gpu = ROOT / "bench" / "results" / "gpu"
    if gpu.exists():  # bench/gpu.sh's results: named in BENCHMARKS.md by the script, GPU figures labelled as such
        assert "bench/gpu.sh" in text
        for js in gpu.glob("*.json"):
            device = json.loads(js.read_text())["device"]
            assert device["type"] == "cuda" and device["gpu"], js
            assert js.with_suffix(".md").read_text().startswith(f"Device: GPU {device['gpu']} "), js
    assert not re.search(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", text)  # no commit hashes
    assert "| commit |" not in text


def test_bench_data_smoke(cli, one_error, tmp_path, monkeypatch):
    """camkd's folder loader and torchvision's on 8 generated JPEGs at 32 px, in the main process; then the store
    parts (cache-teachers against plain inference, distill against ce) at 16 px."""
    monkeypatch.chdir(tmp_path)  # whatever the bench writes outside --out (and --root) would land here
    args = ["bench", "data", "--images", "8", "--classes", "2", "--image-size", "32", "--batch-size", "4", "--workers", "0",
            "--repeats", "1", "--device", "cpu", "--store-image-size", "16", "--teacher-arch", "resnet8"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"Device: CPU ({cpu_model()}, 1 thread);") and "| 0 |" in r.output
    assert "RandomResizedCrop **16 px** views (the table above: 32 px)" in r.output  # the size the store parts used
    assert "| cache-teachers " in r.output and "| distill --method kd " in r.output
    assert list(tmp_path.iterdir()) == []  # the images went to a temporary folder, removed
    out = tmp_path / "results" / "data"
    r = cli(*args, "--root", tmp_path / "images", "--out", out)
    assert r.exit_code == 0, r.output
    whole = json.loads(out.with_suffix(".json").read_text())
    assert whole["data"]["images"] == 8 and whole["data"]["classes"] == 2 and whole["device"]["type"] == "cpu"
    rates = whole["images_per_s"]["0"]
    assert finite_positive(rates["camkd"]) and finite_positive(rates["torchvision"])
    assert whole["camkd_over_torchvision"]["0"] == pytest.approx(rates["camkd"] / rates["torchvision"])
    assert [len(v) for v in whole["rounds"]["0"].values()] == [1, 1]  # --repeats 1: one timed round each
    store = whole["store"]
    assert (store["image_size"], store["workers"], store["teachers"], store["student"]) == (16, 0, ["resnet8"], "resnet8")
    assert set(store["distill_over_ce"]) == {"kd", "avg"} and set(store["train_images_per_s"]) == {"ce", "kd", "avg"}
    for v in [store["cache_over_inference"], *store["distill_over_ce"].values(), *store["samples_per_s"].values(),
              *store["train_images_per_s"].values()]:
        assert finite_positive(v)
    assert store["distill_over_ce"]["kd"] == pytest.approx(store["train_images_per_s"]["kd"] / store["train_images_per_s"]["ce"])
    assert store["cache_over_inference"] == pytest.approx(store["samples_per_s"]["cache"] / store["samples_per_s"]["inference"])
    assert all(len(v) == 1 for v in store["rounds"].values())
    assert len(list((tmp_path / "images" / "train").rglob("*.jpg"))) == 8  # --root keeps them
    assert len(list((tmp_path / "images" / "val").rglob("*.jpg"))) == 2  # one per class, for distill's evaluation
    assert Image.open(next((tmp_path / "images" / "train").rglob("*.jpg"))).size in ((500, 375), (375, 500))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "results"]
    one_error(cli(*args[:2], "--images", "2", "--classes", "3"), r"^error: bench data: --classes 3 is more than --images 2")
    one_error(cli(*args[:2], "--student", "resnet9"), r"^error: bench data: unknown arch 'resnet9'; choose one of: ")


def test_gpu_script_parses_and_says_so_without_nvidia_smi(tmp_path):
    """bench/gpu.sh is valid bash, and where nvidia-smi is missing (a PATH without it) or fails it stops with one
    line before writing anything."""
    import shutil
    import subprocess

    script, bash = ROOT / "bench" / "gpu.sh", shutil.which("bash")
    assert subprocess.run([bash, "-n", script], capture_output=True, text=True).returncode == 0
    results = ROOT / "bench" / "results"
    before = sorted(results.rglob("*"))
    bare = tmp_path / "bin"  # a PATH with nothing in it: no nvidia-smi, and no other command either
    bare.mkdir()
    r = subprocess.run([bash, script], env={"PATH": str(bare)}, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "bench/gpu.sh: nvidia-smi not found: this script needs an NVIDIA GPU and its driver; nothing was run\n"
    smi = bare / "nvidia-smi"  # there, but failing as it does without a driver
    smi.write_text("#!" + bash + "\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\n"
                   "echo 'Make sure that the latest NVIDIA driver is installed and running.'\nexit 9\n")
    smi.chmod(0o755)
    r = subprocess.run([bash, script], env={"PATH": str(bare)}, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("bench/gpu.sh: nvidia-smi failed (no usable GPU or driver): NVIDIA-SMI has failed because it "
                        "could not communicate with the NVIDIA driver.\n")
    if (ROOT / ".venv" / "bin" / "python").exists() and not torch.cuda.is_available():
        smi.write_text("#!" + bash + "\necho 'NVIDIA-SMI 1.0'\n")  # working, yet torch sees no GPU (this machine's case)
        r = subprocess.run([bash, script], env={"PATH": str(bare)}, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert re.fullmatch(r"bench/gpu\.sh: torch in \.venv is (built for CUDA [\d.]+ but sees no GPU: check .*|a CPU-only "
                            r"build .*); nothing was run\n", r.stderr), r.stderr
    assert sorted(results.rglob("*")) == before and list(tmp_path.iterdir()) == [bare]


def test_gpu_script_shares_its_budget_so_every_step_runs():
    """Each step's share and the shares kept for the later steps add up: the first keeps 100 % in view, each
    later step keeps what the ones after it need, the last keeps nothing (so no step is cut by the ones before)."""
    text = (ROOT / "bench" / "gpu.sh").read_text()
    steps = [(int(a), int(b)) for a, b in re.findall(r'^step "[^"]+" (\d+) (\d+)', text, flags=re.M)]
    assert len(steps) == 5
    assert steps[0][0] + steps[0][1] == 100 and steps[-1][1] == 0
    for (_, later), (next_share, next_later) in zip(steps, steps[1:]):
        assert later == next_share + next_later
