"""The teacher-output store: round trip, plain-zarr readability, resume after kill -9, appended
views, refusals, corruption, cache-verify, streaming reads and disk full.

Real Zarr stores on disk, synthetic data, two tiny teachers trained once per module, CPU.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import kill_while_writing
from typer.testing import CliRunner

from camkd.cache import CacheConfig, cache_teachers
from camkd.checkpoint import sha256_file
from camkd.cli import app
from camkd.data import load_dataset
from camkd.data.augspec import AugSpec
from camkd.data.order import epoch_order as epoch_windows
from camkd.data.views import augment, view_params
from camkd.errors import CamkdError
from camkd.models import create_model
from camkd.store import Expect, layout, open_store
from camkd.store.reader import FeatureStream
from camkd.teachers import stored_heads

N_RT = 320  # round-trip store: 2 teachers x (penultimate + hint2) float32 -> blocks of 256 rows: 256 + 64 per view
RT = dict(dataset="synthetic", limit=N_RT, views=2, aug_seed=3, features=["penultimate", "hint:2"], dtype="float32",
          batch_size=160, device="cpu", progress=False)


# ---- helpers -------------------------------------------------------------------------------------

def arrays(path: Path) -> dict[str, zarr.Array]:
    """Every array of a store, by its path, through plain zarr."""
    out = {}

    def walk(g, prefix=""):
        for name, node in g.members():
            if isinstance(node, zarr.Group):
                walk(node, f"{prefix}{name}/")
            else:
                out[f"{prefix}{name}"] = node

    walk(zarr.open_group(str(path), mode="r"))
    return out


def assert_stores_equal(a: Path, b: Path) -> None:
    """Same attrs, same arrays, every array equal bit for bit (same dtype, shape, values)."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert dict(ga.attrs) == dict(gb.attrs)
    xa, xb = arrays(a), arrays(b)
    assert xa.keys() == xb.keys()
    for name in xa:
        u, v = np.asarray(xa[name][...]), np.asarray(xb[name][...])
        assert u.dtype == v.dtype and u.shape == v.shape, name
        assert np.array_equal(u.view(np.uint8), v.view(np.uint8)), f"{name} differs"


def snapshot(path: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file under ``path``: proves a store was not touched."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file():
            out[str(f.relative_to(path))] = (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
    return out


def clone(src: Path, dst: Path) -> Path:
    """A cheap copy (hard links); zarr replaces files on write, and `rewrite` unlinks first."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def rewrite(f: Path, data: bytes) -> None:
    f.unlink()
    f.write_bytes(data)


def chunk_file(store: Path, array: str, view: int, row_chunk: int) -> Path:
    """The file of (view, row chunk/shard) of an array (default 'c/' key encoding, '/' separator)."""
    meta = zarr.open_array(str(store / array), mode="r").metadata
    ndim = len(meta.shape)
    f = store / array / "c" / str(view) / str(row_chunk) / "/".join(["0"] * (ndim - 2))
    assert f.is_file(), f
    return f


def recompute(ckpt: Path, n: int, seed: int, view: int, idx: np.ndarray):
    """An independent forward pass: checkpoint -> model, augmented batch, (features, logits)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = create_model(state["meta"]["arch"], num_classes=10, in_channels=3)
    model.load_state_dict(state["model"])
    model.eval()
    data = load_dataset("synthetic", "train", limit=n)
    x, _ = augment(data.images, torch.from_numpy(idx), AugSpec(seed=seed, norm=data.norm), view=view)
    with torch.no_grad():
        feats, logits = model(x, is_feat=True)
    return feats, logits


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Two seeded, untrained camkd checkpoints (the store does not care how good a teacher is)."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for seed, arch in enumerate(("resnet8", "wrn_16_1")):
        torch.manual_seed(seed)
        model = create_model(arch, num_classes=10, in_channels=3)
        (root / arch).mkdir()
        out[arch] = root / arch / "best.pth"
        torch.save({"model": model.state_dict(), "meta": {"arch": arch, "num_classes": 10, "in_channels": 3}}, out[arch])
    return out


@pytest.fixture(scope="module")
def rt(teachers, tmp_path_factory):
    """The round-trip store: resnet8 + wrn_16_1, V=2, penultimate + hint:2, float32, N=320 (made in-process)."""
    path = tmp_path_factory.mktemp("rt") / "s.zarr"
    summary = cache_teachers(CacheConfig(teachers=[str(teachers["resnet8"]), str(teachers["wrn_16_1"])], out=str(path), **RT))
    return path, summary


@pytest.fixture(scope="module")
def small(teachers, tmp_path_factory):
    """A store made by the CLI, and the arguments that made it."""
    path = tmp_path_factory.mktemp("small") / "s.zarr"
    args = ["-d", "synthetic", "--limit", "128", "-V", "1", "-f", "penultimate", "--dtype", "float16", "--device", "cpu",
            "-q", "--out", str(path)]
    r = CliRunner().invoke(app, ["cache-teachers", "-t", str(teachers["resnet8"]), *args])
    assert r.exit_code == 0, r.output
    return path, args


def _replace_opt(args, opt, value):
    args = list(args)
    if opt in args:
        args[args.index(opt) + 1] = value
    else:
        args += [opt, value]
    return args


def rt_teacher_args(teachers):
    return ["-t", teachers["resnet8"], "-t", teachers["wrn_16_1"]]


# ---- 1. round trip -------------------------------------------------------------------------------

def test_round_trip_equals_independent_recomputation(rt, teachers):
    path, summary = rt
    assert summary["rows_computed"] == 2 * N_RT and summary["n"] == N_RT and summary["views"] == 2
    store = open_store(path, expect=Expect(layers=("penultimate", "hint2"), num_classes=10))
    assert store.block_rows == 256 and store.progress().shape == (2, 2) and store.progress().all()
    data = load_dataset("synthetic", "train", limit=N_RT)
    assert np.array_equal(store.labels(), data.labels.numpy())
    spec = AugSpec(seed=RT["aug_seed"], norm=data.norm)
    idx = np.array([0, 5, 99, 100, 255, 256, 300, 319])
    heads = stored_heads(store)
    for v in range(2):
        assert np.array_equal(store.aug(v), view_params(spec, v, np.arange(N_RT)).numpy())
        logits = store.logits(v).numpy()
        assert logits.shape == (N_RT, 2, 10) and logits.dtype == np.float32
        pen, hint = store.features("penultimate", v), store.features("hint2", v)
        for k, arch in enumerate(("resnet8", "wrn_16_1")):
            feats, ref = recompute(teachers[arch], N_RT, RT["aug_seed"], v, idx)
            np.testing.assert_allclose(logits[idx, k], ref.numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(pen[k][idx], feats[-2].numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(hint[k][idx], feats[2].numpy(), rtol=1e-4, atol=1e-4)
            # the stored head turns stored penultimate features into the stored logits
            with torch.no_grad():
                from_head = heads[k](torch.from_numpy(pen[k])).numpy()
            np.testing.assert_allclose(from_head, logits[:, k], rtol=1e-4, atol=1e-4)
    assert store.feature_shapes("penultimate") == [(64, 8, 8), (64, 8, 8)]
    assert store.feature_shapes("hint2") == [(32, 16, 16), (32, 16, 16)]


# ---- 2. plain zarr -------------------------------------------------------------------------------

def test_readable_with_plain_zarr(rt, teachers):
    path, _ = rt
    g = zarr.open_group(str(path), mode="r")
    assert g.metadata.zarr_format == 3
    a = g.attrs["camkd"]
    for key in ("format_version", "dataset", "augmentation", "teachers", "dtype", "views", "features", "camkd_version"):
        assert key in a, key
    assert a["format_version"] == layout.FORMAT_VERSION and a["dtype"] == "float32" and a["views"] == 2
    ds = load_dataset("synthetic", "train", limit=N_RT)
    assert a["dataset"]["name"] == "synthetic" and a["dataset"]["n"] == N_RT and a["dataset"]["fingerprint"] == ds.fingerprint
    assert a["augmentation"]["seed"] == RT["aug_seed"] and a["augmentation"]["padding"] == 4
    assert [t["arch"] for t in a["teachers"]] == ["resnet8", "wrn_16_1"]
    assert [t["sha256"] for t in a["teachers"]] == [sha256_file(teachers["resnet8"]), sha256_file(teachers["wrn_16_1"])]
    assert all(0 <= t["test_accuracy"] <= 100 for t in a["teachers"])
    assert set(a["features"]) == {"penultimate", "hint2"} and a["features"]["hint2"]["index"] == 2
    expected_dims = {"labels": 1, "aug": 3, "logits": 4, "progress": 2}
    found = arrays(path)
    for name, arr in found.items():
        dims = arr.metadata.dimension_names
        assert dims is not None and len(dims) == arr.ndim and all(dims), name
        if name in expected_dims:
            assert arr.ndim == expected_dims[name], name
        if name.startswith("features/"):
            assert dims == ("view", "sample", "channel", "height", "width")
    assert found["logits"].metadata.dimension_names == ("view", "sample", "teacher", "class")
    assert {f"features/{l}/t{k}" for l in ("penultimate", "hint2") for k in (0, 1)} <= found.keys()
    assert {"heads/t0/fc.weight", "heads/t0/fc.bias", "heads/t1/fc.weight", "heads/t1/fc.bias"} <= found.keys()
    # features are sharded per writer block, chunks of at most ~4 MB
    hint = found["features/hint2/t0"]
    assert hint.shards == (1, 256, 32, 16, 16) and hint.chunks[1] * 32 * 16 * 16 * 4 <= layout.CHUNK_TARGET_BYTES


# ---- 3. bit-identical resume after SIGKILL -------------------------------------------------------

def _progress(path: Path):
    try:
        return np.asarray(zarr.open_array(str(path / "progress"), mode="r")[...])
    except Exception:  # not created yet
        return None


def cache_cmd(teachers, out: Path, views: int = 2) -> list[str]:
    """resnet8 with penultimate + hint:1 in float32: ~80 KB a row -> blocks of 256 rows, per view 256 + 128 (~30 MB)."""
    return [sys.executable, "-m", "camkd.cli", "cache-teachers", "-t", str(teachers["resnet8"]), "-d", "synthetic",
            "--limit", "384", "-V", str(views), "-f", "penultimate", "-f", "hint:1", "--dtype", "float32",
            "--batch-size", "128", "--device", "cpu", "-q", "--out", str(out)]


@pytest.fixture(scope="module")
def uninterrupted(teachers, tmp_path_factory):
    """Stores written by one uninterrupted `cache_cmd` subprocess, by number of views (made on first use)."""
    made = {}

    def get(views: int) -> Path:
        if views not in made:
            out = tmp_path_factory.mktemp("uninterrupted") / f"v{views}.zarr"
            r = subprocess.run(cache_cmd(teachers, out, views), capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
            made[views] = out
        return made[views]

    return get


def test_resume_after_sigkill_is_bit_identical(teachers, uninterrupted, tmp_path):
    def views_of(attempt: int) -> int:
        return 2 if attempt < 3 else 6  # from the fourth try on more work, if it kept finishing before the kill

    def start(attempt: int):
        killed = tmp_path / f"killed{attempt}.zarr"
        cmd = cache_cmd(teachers, killed, views_of(attempt))
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), killed

    attempt, killed, after = kill_while_writing(start, _progress, attempts=5)
    views = views_of(attempt)
    print(f"killed at attempt {attempt} with {int(after.sum())}/{after.size} blocks flagged")
    resumed = subprocess.run(cache_cmd(teachers, killed, views), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    # only the blocks without a flag were computed (256 and 128 rows, alternating)
    m = re.search(r"cached (\d+) sample-views", resumed.stdout)
    assert int(m.group(1)) == sum(rows for rows, f in zip([256, 128] * views, after.reshape(-1)) if not f)
    assert_stores_equal(killed, uninterrupted(views))
    assert not list(killed.rglob("*.partial")), "temporary files of the killed write left in the store"


def test_interrupted_while_creating_resumes(cli, teachers, small, tmp_path, interrupted_creation):
    """Stopped half-way through creating the store, the same command must still go on (not refuse a half store)."""
    path, args = small
    out = tmp_path / "s.zarr"
    args = ["cache-teachers", "-t", teachers["resnet8"], *_replace_opt(args, "--out", str(out))]
    assert cli(*args).exit_code == 130
    interrupted_creation.restore()
    assert len(interrupted_creation.calls) == 3 and not out.exists()
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert_stores_equal(out, path)
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # no temporary folder left


def test_rerun_removes_temporary_files_of_a_killed_write(cli, teachers, small, tmp_path):
    path, args = small
    copy = clone(path, tmp_path / "s.zarr")
    junk = copy / "features" / "penultimate" / "t0" / "c" / "0" / ("0." + "ab" * 16 + ".partial")
    junk.write_bytes(b"half a shard")
    r = cli("cache-teachers", "-t", teachers["resnet8"], *_replace_opt(args, "--out", str(copy)))
    assert r.exit_code == 0 and r.output.strip().endswith("is complete (1 view x 128 samples): nothing to compute (a "
                                                          "larger -V adds views)"), r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert not junk.exists()
    assert_stores_equal(copy, path)


# ---- 4. appending views --------------------------------------------------------------------------

def test_more_views_append_without_recomputing(teachers, tmp_path):
    base = dict(teachers=[str(teachers["resnet8"])], dataset="synthetic", limit=128, features=["penultimate"],
                dtype="float16", batch_size=128, device="cpu", progress=False, aug_seed=1)
    path = tmp_path / "grow.zarr"
    s1 = cache_teachers(CacheConfig(**base, views=1, out=str(path)))
    assert s1["rows_computed"] == 128
    view0 = {f: (f.stat().st_mtime_ns, f.read_bytes()) for name in ("aug", "logits", "features/penultimate/t0", "progress")
             for f in (path / name / "c" / "0").rglob("*") if f.is_file()}
    assert len(view0) >= 4
    time.sleep(0.01)
    s3 = cache_teachers(CacheConfig(**base, views=3, out=str(path)))
    assert s3["rows_computed"] == 2 * 128 and s3["views"] == 3
    for f, (mtime, data) in view0.items():
        assert f.stat().st_mtime_ns == mtime and f.read_bytes() == data, f  # view 0 not rewritten
    fresh = tmp_path / "fresh.zarr"
    cache_teachers(CacheConfig(**base, views=3, out=str(fresh)))
    assert_stores_equal(path, fresh)
    # asking for fewer views than stored computes nothing and keeps all
    s = cache_teachers(CacheConfig(**base, views=2, out=str(path)))
    assert s["complete"] and s["message"].endswith("is complete (3 views x 128 samples): nothing to compute; -V 2 is "
                                                   "below its 3 views and changes nothing (a larger -V adds views)")


# ---- 5. refusals ---------------------------------------------------------------------------------

def test_other_dataset_is_named_first(tmp_path):
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8", num_classes=10, in_channels=1).state_dict()}, tmp_path / "t.pth")
    base = dict(teachers=[f"resnet8={tmp_path / 't.pth'}"], limit=64, views=1, features=["none"], out=str(tmp_path / "s.zarr"),
                device="cpu", progress=False, evaluate=False)
    cache_teachers(CacheConfig(dataset="synthetic", options={"channels": 1, "image_size": 28}, **base))
    with pytest.raises(CamkdError, match=r"made differently: --dataset synthetic in the store, fashion-mnist now; the "
                                         r"training data differ \(fingerprint [0-9a-f]{12}\.\.\. in the store, "
                                         r"[0-9a-f]{12}\.\.\. now\); .*; use --overwrite"):
        cache_teachers(CacheConfig(dataset="fashion-mnist", **base))


def test_features_none_with_layers_is_refused(cli, teachers, tmp_path, one_error):
    r = cli("cache-teachers", "-t", teachers["resnet8"], "-d", "synthetic", "--limit", "64", "-V", "1", "-f", "none", "-f",
            "penultimate", "--device", "cpu", "-q", "--out", tmp_path / "s.zarr")
    one_error(r, r"-f none stores no features, but layers are given too \(none, penultimate\)")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("change, pattern", [
    (("--limit", "100"), r"made differently: the store caches 128 samples \(--limit 128\), this run has 100; use "
                         r"--overwrite"),
    (("--aug-seed", "7"), r"made differently: --aug-seed 0 in the store, 7 now; use"),
    (("--dtype", "float32"), r"made differently: --dtype float16 in the store, float32 now; use"),
    (("-f", "hint:2"), r"made differently: the store holds no hint2 features \(-f penultimate\), this run asks for them; "),
])
def test_refuses_other_options_naming_the_difference(cli, teachers, small, change, pattern, one_error):
    path, args = small
    before = snapshot(path)
    new = args + list(change) if change[0] == "-f" else _replace_opt(args, *change)
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *new), pattern)
    assert snapshot(path) == before


def test_store_without_features_names_dtype_alone_and_the_asked_layer(cli, teachers, tmp_path, one_error):
    """-f none stores no features: their type is no difference; a layer asked for says the store was made with -f none."""
    args = ["-d", "synthetic", "--limit", "64", "-V", "1", "--device", "cpu", "-q", "--no-eval", "--out", tmp_path / "s.zarr"]
    assert cli("cache-teachers", "-t", teachers["resnet8"], "-f", "none", *args).exit_code == 0
    line = one_error(cli("cache-teachers", "-t", teachers["resnet8"], "-f", "none", "--dtype", "float32", *args),
                     r"made differently: --dtype float16 in the store, float32 now; use --overwrite")
    assert "--feature-dtype" not in line, line
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], "-f", "penultimate", *args),
              r"made differently: the store holds no penultimate features \(-f none\), this run asks for them; use")


def test_refuses_other_layers_dropped(cli, teachers, small, one_error):
    path, args = small
    before = snapshot(path)
    new = _replace_opt(args, "-f", "none")
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *new),
              r"made differently: the store holds penultimate features \(-f penultimate\), this run does not ask for them; ")
    assert snapshot(path) == before


def test_refuses_other_teachers(cli, teachers, small, tmp_path, one_error):
    path, args = small
    before = snapshot(path)
    h8, h16 = sha256_file(teachers["resnet8"])[:12], sha256_file(teachers["wrn_16_1"])[:12]
    one_error(cli("cache-teachers", "-t", teachers["wrn_16_1"], *args),
              rf"made differently: teacher 1 is resnet8 \(sha256 {h8}\.\.\.\) in the store, wrn_16_1 \(sha256 {h16}\.\.\.\) now; ")
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], "-t", teachers["wrn_16_1"], *args),
              r"made differently: the store has 1 teacher \(resnet8\), this run 2 \(resnet8, wrn_16_1\); ")
    # same arch and file name, other weights: the message must name the checkpoint digest
    ckpt = torch.load(teachers["resnet8"], map_location="cpu", weights_only=True)
    ckpt["model"] = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in ckpt["model"].items()}
    other = tmp_path / "other" / teachers["resnet8"].name
    other.parent.mkdir()
    torch.save(ckpt, other)
    msg = one_error(cli("cache-teachers", "-t", other, *args), r"teacher 1 is resnet8 \(sha256 \w{12}\.\.\.\) in the store")
    assert sha256_file(other)[:12] in msg and sha256_file(teachers["resnet8"])[:12] in msg, msg
    assert sha256_file(other)[:13] not in msg, msg
    assert snapshot(path) == before


def test_overwrite_replaces(cli, teachers, small, tmp_path):
    path, args = small
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    args = _replace_opt(_replace_opt(args, "--out", str(copy)), "--aug-seed", "7")
    r = cli("cache-teachers", "-t", teachers["resnet8"], *args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert open_store(copy).attrs["augmentation"]["seed"] == 7 and open_store(copy).progress().all()


def test_refuses_path_that_is_no_store(cli, teachers, small, tmp_path, one_error):
    _, args = small
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *_replace_opt(args, "--out", str(folder))),
                       r"folder exists and is not a camkd store; choose another --out$")
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *_replace_opt(args, "--out", str(folder)), "--overwrite"),
                       r"folder exists and is not a Zarr store; refusing to delete it even with --overwrite")
    assert (folder / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "file.zarr"
    a_file.write_text("mine")
    for extra in ([], ["--overwrite"]):
        one_error(cli("cache-teachers", "-t", teachers["resnet8"], *_replace_opt(args, "--out", str(a_file)), *extra),
                           r"file\.zarr exists and is not a (camkd|Zarr) store")
        assert a_file.read_text() == "mine"
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").create_array("x", shape=(3,), dtype="i4")
    before = snapshot(plain)
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *_replace_opt(args, "--out", str(plain))),
                       r"plain\.zarr is a Zarr group but not a camkd store.*--overwrite")
    assert snapshot(plain) == before
    with pytest.raises(CamkdError, match="not a camkd store"):
        open_store(plain)
    with pytest.raises(CamkdError, match="not a camkd store"):
        open_store(folder)


def test_refuses_bad_teacher_checkpoints(cli, teachers, small, tmp_path, one_error):
    path, args = small
    before = snapshot(path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage, not a checkpoint")
    one_error(cli("cache-teachers", "-t", bad, *args), r"bad\.pth is not a readable (torch )?checkpoint")
    one_error(cli("cache-teachers", "-t", tmp_path / "missing.pth", *args), r"missing\.pth not found")
    # a reference checkpoint {'model': state_dict} of a 5-class resnet8
    five = tmp_path / "five.pth"
    torch.save({"model": create_model("resnet8", num_classes=5, in_channels=3).state_dict()}, five)
    one_error(cli("cache-teachers", "-t", f"resnet8={five}", *args), r"five\.pth has 5 classes but synthetic has 10")
    one_error(cli("cache-teachers", "-t", f"wrn_16_1={teachers['resnet8']}", *args), r"does not fit arch 'wrn_16_1'")
    one_error(cli("cache-teachers", "-t", five, *args), r"names no arch.*ARCH=PATH")
    assert snapshot(path) == before


# ---- 6. corrupted and truncated chunks -----------------------------------------------------------

def test_corrupt_and_truncated_chunks_are_named(cli, rt, teachers, tmp_path, one_error):
    path, _ = rt
    bad = clone(path, tmp_path / "bad.zarr")
    f = chunk_file(bad, "logits", 1, 0)  # view 1, rows 0:256 (one chunk per block)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rewrite(f, bytes(data))
    f = chunk_file(bad, "features/hint2/t1", 0, 1)  # view 0, second block (rows 256:320), a shard
    rewrite(f, f.read_bytes()[: len(f.read_bytes()) // 2])
    store = open_store(bad)
    store.logits(0)  # untouched view reads
    with pytest.raises(CamkdError, match=r"array 'logits' view 1 cannot be read.*cache-verify"):
        store.logits(1)
    store.features("hint2", 0, slice(0, 256))
    with pytest.raises(CamkdError, match=r"array 'features/hint2/t1' view 0 rows 256:320 cannot be read"):
        store.features("hint2", 0, slice(256, 320))
    r = cli("cache-verify", bad, *rt_teacher_args(teachers), "--sample", "16", "--device", "cpu")
    assert r.exit_code == 1, r.output
    assert "CORRUPT" in r.output and "logits view 1 rows 0:256 (a chunk fails its checksum)" in r.output, r.output
    assert "features/hint2/t1 view 0 rows 256:320" in r.output, r.output
    assert not re.search(r"[A-Z]\w+Error", r.output), r.output  # what is known, not exception class names
    verdict = r.output.splitlines()[-1]
    assert verdict.startswith("verdict: CORRUPT — 2 written blocks are damaged") and "--repair" in verdict, verdict
    # re-running the same cache-teachers command on it: every block is flagged written, so nothing to compute (not a
    # traceback); cache-verify --repair is what makes the damaged blocks computed again
    args = ["-d", "synthetic", "--limit", str(N_RT), "-V", "2", "-f", "penultimate", "-f", "hint:2", "--dtype", "float32",
            "--aug-seed", str(RT["aug_seed"]), "--batch-size", "160", "--device", "cpu", "-q", "--out", bad]
    r = cli("cache-teachers", *rt_teacher_args(teachers), *args)
    assert r.exit_code == 0 and "is complete (2 views x 320 samples): nothing to compute" in r.output, r.output


def test_chunk_truncated_to_nothing_is_reported(cli, rt, teachers, tmp_path):
    """A zero-length chunk file (what a crash can leave on some filesystems) decodes as fill values in zarr."""
    path, _ = rt
    bad = clone(path, tmp_path / "empty.zarr")
    rewrite(chunk_file(bad, "features/penultimate/t0", 1, 0), b"")
    r = cli("cache-verify", bad, *rt_teacher_args(teachers), "--sample", "8", "--device", "cpu")
    assert r.exit_code == 1, r.output
    assert "features/penultimate/t0 view 1 rows 0:256" in r.output, r.output


def test_deleted_chunk_file_is_reported(cli, rt, teachers, tmp_path):
    """Every chunk is written (write_empty_chunks), so a missing file is damage, not a fill-value chunk."""
    path, _ = rt
    bad = clone(path, tmp_path / "deleted.zarr")
    chunk_file(bad, "logits", 0, 1).unlink()
    r = cli("cache-verify", bad, *rt_teacher_args(teachers), "--sample", "8", "--device", "cpu")
    assert r.exit_code == 1, r.output
    assert "logits view 0 rows 256:320 (chunk file missing)" in r.output, r.output


# ---- 7. cache-verify ----------------------------------------------------------------------------

def test_verify_passes_on_good_store(cli, rt, teachers):
    path, _ = rt
    r = cli("cache-verify", path, *rt_teacher_args(teachers), "--sample", "48", "--device", "cpu")
    assert r.exit_code == 0, r.output
    out = r.output.splitlines()
    assert out[-1] == "verdict: OK" and "every written chunk passes its checksum" in out and out[0].startswith("complete")
    diffs = {line.split(":")[0]: float(line.split("largest difference ")[1].split()[0]) for line in out if "largest difference" in line}
    assert set(diffs) == {"logits"} | {f"features/{l}/t{k}" for l in ("penultimate", "hint2") for k in (0, 1)}
    assert max(diffs.values()) < 1e-3
    assert all("over 48 (view, index) pairs" in line for line in out if "largest difference" in line)  # 48 distinct pairs
    # each beside the tolerance it was held to (float32: its epsilon relative, plus 1e-4 slack)
    assert all(line.endswith("; tolerance per value x: 1.19e-07|x| + 0.0001(1 + |x|) (float32)")
               for line in out if "largest difference" in line), out


def test_verify_sample_pairs_are_distinct_and_cover_only_flagged_blocks(rt):
    from camkd.store import open_store
    from camkd.store.verify import _sample_pairs

    path, _ = rt
    store = open_store(path)
    flags = np.zeros((store.views, -(-store.n // store.block_rows)), dtype=np.uint8)
    flags[1, 0] = 1  # one flagged block: view 1, the first block's rows
    rows = min(store.block_rows, store.n)
    pairs = _sample_pairs(store, flags, 10**6, seed=0)  # more than there are: every pair once
    assert pairs == [(1, i) for i in range(rows)]
    some = _sample_pairs(store, flags, 5, seed=1)
    assert len(set(some)) == 5 and set(some) <= set(pairs)
    flags[:] = 1
    every = _sample_pairs(store, flags, 10**6, seed=0)
    assert every == [(v, i) for v in range(store.views) for i in range(store.n)]


def test_verify_fails_on_tampered_store(cli, rt, teachers, tmp_path, one_error):
    path, _ = rt
    bad = clone(path, tmp_path / "tampered.zarr")
    g = zarr.open_group(str(bad), mode="r+")
    logits = np.asarray(g["logits"][0])
    g["logits"][0] = logits + np.float32(0.01)  # valid checksums, wrong values
    r = cli("cache-verify", bad, *rt_teacher_args(teachers), "--sample", "16", "--device", "cpu")
    assert r.exit_code == 1, r.output
    assert "MISMATCH: logits view 0" in r.output and r.output.splitlines()[-1].startswith("verdict: FAILED"), r.output
    g["logits"][0] = logits
    g["aug"][1, 0:320] = np.asarray(g["aug"][1])[::-1]
    r = cli("cache-verify", bad, *rt_teacher_args(teachers), "--sample", "16", "--device", "cpu")
    assert r.exit_code == 1 and "augmentation parameters of view 1" in r.output, r.output
    # the teachers must be the store's
    r = cli("cache-verify", path, "-t", teachers["wrn_16_1"], "-t", teachers["resnet8"], "--device", "cpu")
    one_error(r, r"-t number 1 \(.*wrn_16_1.*\) is not the store's teacher 1 \(resnet8")
    one_error(cli("cache-verify", path, "-t", teachers["resnet8"], "--device", "cpu"),
              r"the store has 2 teachers \(resnet8, wrn_16_1\), 1 given with -t")
    # incomplete
    g["aug"][1] = np.asarray(zarr.open_group(str(path), mode="r")["aug"][1])
    g["progress"][1, 1] = 0
    r = cli("cache-verify", bad, *rt_teacher_args(teachers), "--device", "cpu")
    assert r.exit_code == 1 and "INCOMPLETE: 1 block missing (first: view 1 block 1)" in r.output, r.output


def test_verify_store_made_with_limit(cli, small, teachers):
    """The CLI caches synthetic data with --limit (first N of the default set); verify must find the same data."""
    path, _ = small
    r = cli("cache-verify", path, "-t", teachers["resnet8"], "--sample", "16", "--device", "cpu")
    assert r.exit_code == 0, r.output


# ---- 8. reader: epoch plans and streaming --------------------------------------------------------

def test_epoch_windows_cover_each_index_once():
    n, br = 1000, 64  # 16 blocks, the last one partial
    for wb in (1, 3, 16, None):
        plans = []
        for epoch in range(3):
            windows = epoch_windows(n, seed=5, epoch=epoch, block_rows=br, window_blocks=wb)
            flat = np.concatenate(windows)
            assert np.array_equal(np.sort(flat), np.arange(n))
            assert all(w.dtype == np.int64 for w in windows)
            if wb is not None:
                assert len(windows) == -(-layout.num_blocks(n, br) // wb)
                for w in windows:  # a window is made of whole blocks, at most wb of them
                    blocks = set((w // br).tolist())
                    assert len(blocks) <= wb
                    assert len(w) == sum(layout.block_slice(b, n, br).stop - layout.block_slice(b, n, br).start for b in blocks)
            plans.append(flat)
            again = np.concatenate(epoch_windows(n, seed=5, epoch=epoch, block_rows=br, window_blocks=wb))
            assert np.array_equal(flat, again)  # a pure function of its arguments
        assert not np.array_equal(plans[0], plans[1]) and not np.array_equal(plans[1], plans[2])
        other_seed = np.concatenate(epoch_windows(n, seed=6, epoch=0, block_rows=br, window_blocks=wb))
        assert not np.array_equal(plans[0], other_seed)


@pytest.mark.parametrize("window_blocks", [1, 2])
def test_feature_stream_yields_every_row_once(rt, window_blocks):
    path, _ = rt
    store = open_store(path)
    layers = ("penultimate", "hint2")
    whole = {layer: store.features(layer, 1) for layer in layers}
    windows = epoch_windows(store.n, seed=0, epoch=4, block_rows=store.block_rows, window_blocks=window_blocks)
    seen = []
    for idx, feats in FeatureStream(store, layers, 1, windows, prefetch=1):
        seen.append(idx)
        for layer in layers:
            assert len(feats[layer]) == 2
            for t in range(2):
                assert np.array_equal(feats[layer][t], whole[layer][t][idx])
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(store.n))
    assert len(seen) == len(windows)


def test_feature_stream_stops_early_and_reports_errors(rt, tmp_path):
    path, _ = rt
    store = open_store(path)
    windows = epoch_windows(store.n, seed=0, epoch=0, block_rows=store.block_rows, window_blocks=1)
    stream = FeatureStream(store, ("hint2",), 0, windows)
    for _ in stream:
        break  # leaving early stops the prefetch thread
    assert not [t for t in threading.enumerate() if t.name.startswith("camkd-prefetch")]
    bad = clone(path, tmp_path / "bad.zarr")
    f = chunk_file(bad, "features/hint2/t0", 0, 0)
    rewrite(f, f.read_bytes()[:100])
    with pytest.raises(CamkdError, match=r"features/hint2/t0' view 0 rows 0:256"):
        for _ in FeatureStream(open_store(bad), ("hint2",), 0, windows):
            pass


# ---- 9. open_store expectations ----------------------------------------------------------------

def test_open_store_expectations(rt, tmp_path):
    path, _ = rt
    fp = open_store(path).attrs["dataset"]["fingerprint"]
    aug = open_store(path).attrs["augmentation"]
    open_store(path, expect=Expect(dataset_fingerprint=fp, dataset_name="synthetic", augmentation=aug, num_classes=10,
                                   layers=("penultimate", "hint2")))
    with pytest.raises(CamkdError, match=r"other data \(fingerprint .*the dataset or --limit changed"):
        open_store(path, expect=Expect(dataset_fingerprint=load_dataset("synthetic", "train", limit=100).fingerprint))
    with pytest.raises(CamkdError, match=r"has 10 classes, the student needs 5"):
        open_store(path, expect=Expect(num_classes=5))
    with pytest.raises(CamkdError, match=r"caches dataset 'synthetic', not 'cifar100'"):
        open_store(path, expect=Expect(dataset_name="cifar100"))
    with pytest.raises(CamkdError, match=r"augmentation .*--aug-seed"):
        open_store(path, expect=Expect(augmentation=dict(aug, seed=0)))
    with pytest.raises(CamkdError, match=r"no 'hint3' features; re-cache with .*--features hint:3"):
        open_store(path, expect=Expect(layers=("penultimate", "hint3")))
    with pytest.raises(CamkdError, match=r"not found; create it with 'camkd cache-teachers"):
        open_store(tmp_path / "nowhere.zarr")
    partial = clone(path, tmp_path / "partial.zarr")
    zarr.open_group(str(partial), mode="r+")["progress"][0, 1] = 0
    open_store(partial)  # opening without expectations works (cache-info)
    with pytest.raises(CamkdError, match=r"incomplete \(1 block missing, first: view 0 block 1\); rerun the same cache-teachers"):
        open_store(partial, expect=Expect())


def test_cache_info(cli, rt):
    path, _ = rt
    r = cli("cache-info", path)
    assert r.exit_code == 0, r.output
    assert "N=320" in r.output and "complete   4/4 blocks" in r.output and "features/hint2/t1" in r.output
    assert "[view,sample,teacher,class]" in r.output


# ---- 10. disk full ------------------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 40 MB tmpfs (needs root / CAP_SYS_ADMIN; skipped where mounting is not permitted)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount command here")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_clean_and_resumable(teachers, uninterrupted, tiny_disk):
    # ~30 MB a view (see cache_cmd): the planned 60 MB is refused up front on a 40 MB disk
    path = tiny_disk / "s.zarr"
    r = subprocess.run(cache_cmd(teachers, path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and not path.exists(), r.stderr
    assert re.search(r"error: .*s\.zarr needs 6\d\.\d MB more but .* has \d+\.\d MB free; .*--no-space-check", r.stderr)
    # told to go on anyway, the disk fills while view 1 is written
    r = subprocess.run(cache_cmd(teachers, path) + ["--no-space-check"], capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert re.fullmatch(r"error: disk full while writing .*s\.zarr; finished blocks are kept, "
                        r"free space and rerun the same command to resume", lines[0]), lines[0]
    flags = _progress(path)
    assert flags is not None and flags[0].all() and not flags[1].all()
    # every flagged block is whole and equal to the uninterrupted run's
    ref = uninterrupted(2)
    got, want = arrays(path), arrays(ref)
    for v, b in zip(*np.nonzero(flags)):
        rows = layout.block_slice(int(b), 384, 256)
        for name in ("aug", "logits", "features/penultimate/t0", "features/hint1/t0"):
            assert np.array_equal(np.asarray(got[name][v, rows]), np.asarray(want[name][v, rows])), (name, v, b)
    assert not list(path.rglob("*.partial"))
    subprocess.run(["mount", "-o", "remount,size=200m", str(tiny_disk)], check=True)
    r = subprocess.run(cache_cmd(teachers, path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert_stores_equal(path, ref)


def test_disk_full_while_creating(cli, teachers, small, tiny_disk, one_error):
    _, args = small
    subprocess.run(["mount", "-o", "remount,size=8k", str(tiny_disk)], check=True)
    path = tiny_disk / "s.zarr"
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *_replace_opt(args, "--out", str(path)),
                           "--no-space-check"), rf"^error: cannot create {re.escape(str(path))}: disk full$")
    assert not list(tiny_disk.iterdir())


# ---- 11. verify: unfinished is not corrupt; repair; no teachers ----------------------------------

def files(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_verify_unfinished_store_is_incomplete_not_corrupt(cli, rt, teachers, tmp_path):
    """What kill -9 leaves: a block without its flag and without its chunk files. That is work to do, not damage."""
    path, _ = rt
    part = clone(path, tmp_path / "part.zarr")
    zarr.open_group(str(part), mode="r+")["progress"][1, 1] = 0
    for name in ("aug", "logits", "features/hint2/t0", "features/penultimate/t1"):
        chunk_file(part, name, 1, 1).unlink()
    r = cli("cache-verify", part, *rt_teacher_args(teachers), "--sample", "16", "--device", "cpu")
    assert r.exit_code == 1, r.output
    assert "INCOMPLETE: 1 block missing (first: view 1 block 1)" in r.output, r.output
    assert "CORRUPT" not in r.output and "missing)" not in r.output, r.output
    assert "largest difference" in r.output  # the written blocks were still checked against the teachers
    assert r.output.splitlines()[-1] == "verdict: INCOMPLETE — rerun the same cache-teachers command to finish", r.output


def test_verify_without_teachers_checks_checksums_only(rt, tmp_path):
    from camkd.cache import cache_verify

    path, _ = rt
    for teachers_given in (None, []):
        rep = cache_verify(path, teachers_given)
        assert rep.ok and rep.lines[-1] == "verdict: OK", rep.lines
        assert any("recomputation skipped: it needs the teachers" in line for line in rep.lines), rep.lines
    bad = clone(path, tmp_path / "bad.zarr")
    f = chunk_file(bad, "logits", 0, 0)
    rewrite(f, f.read_bytes()[:-3] + b"xyz")
    rep = cache_verify(bad, None)
    assert not rep.ok and rep.corrupt_blocks == [(0, 0)] and rep.lines[-1].startswith("verdict: CORRUPT"), rep.lines
    assert rep.lines[1].startswith("CORRUPT: 1 unreadable block: logits view 0"), rep.lines  # one: singular
    assert rep.lines[-1].startswith("verdict: CORRUPT — 1 written block is damaged"), rep.lines
    rep = cache_verify(bad, None, repair=True)
    assert rep.lines[-2:] == ["repaired: cleared the progress flags of 1 block and deleted their damaged chunks",
                              "verdict: REPAIRED — rerun the same cache-teachers command to recompute that block"], rep.lines


def test_repair_then_resume_is_byte_identical(rt, teachers, tmp_path):
    """verify --repair clears exactly the damaged blocks; the same cache-teachers run recomputes only them,
    and every file of the store is then byte-identical to the undamaged store."""
    from camkd.cache import cache_verify

    path, _ = rt
    bad = clone(path, tmp_path / "bad.zarr")
    f = chunk_file(bad, "features/hint2/t1", 0, 1)  # a shard of the last, partial block: zarr would read it to merge
    rewrite(f, f.read_bytes()[: len(f.read_bytes()) // 2])
    f = chunk_file(bad, "logits", 1, 0)  # a flipped byte in a whole-block chunk
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    rewrite(f, bytes(data))
    chunk_file(bad, "features/penultimate/t0", 1, 0).unlink()  # a lost file of the same block
    before = cache_verify(bad, None)
    assert not before.ok and before.corrupt_blocks == [(0, 1), (1, 0)], before.lines
    rep = cache_verify(bad, None, repair=True)
    assert rep.repaired and rep.corrupt_blocks == [(0, 1), (1, 0)], rep.lines
    assert rep.lines[-1] == "verdict: REPAIRED — rerun the same cache-teachers command to recompute those 2 blocks", rep.lines
    flags = open_store(bad).progress()
    assert flags.tolist() == [[1, 0], [0, 1]]
    after = cache_verify(bad, None)  # now only unfinished, not corrupt
    assert after.corrupt_blocks == [] and after.lines[-1].startswith("verdict: INCOMPLETE"), after.lines
    s = cache_teachers(CacheConfig(teachers=[str(teachers["resnet8"]), str(teachers["wrn_16_1"])], out=str(bad), **RT))
    assert s["rows_computed"] == 64 + 256
    assert files(bad) == files(path)
    assert cache_verify(bad, None).ok


# ---- 12. teachers: duplicates, provenance, mismatch messages -------------------------------------

def test_same_teacher_twice_is_refused(cli, teachers, small, tmp_path, one_error):
    from camkd.teachers import load_teachers

    path, args = small
    a = str(teachers["resnet8"])
    copy = tmp_path / "copy.pth"
    shutil.copy(a, copy)
    with pytest.raises(CamkdError, match=r"^teachers 1 and 3 are the same checkpoint \(sha256 [0-9a-f]{12}\): "
                                         rf"{re.escape(a)}, resnet8={re.escape(str(copy))}; give each teacher once$"):
        load_teachers([a, str(teachers["wrn_16_1"]), f"resnet8={copy}"])
    one_error(cli("cache-teachers", "-t", a, "-t", a, *_replace_opt(args, "--out", str(tmp_path / "d.zarr"))),
                       r"teachers 1 and 2 are the same checkpoint")
    assert not (tmp_path / "d.zarr").exists()


def test_state_dict_mismatch_says_what_differs(tmp_path):
    from camkd.teachers import load_teacher

    state = create_model("resnet8", num_classes=10, in_channels=1).state_dict()
    state["extra.weight"] = torch.zeros(3)
    ckpt = tmp_path / "gray.pth"
    torch.save({"model": state, "meta": {"arch": "resnet8", "num_classes": 10, "in_channels": 3}}, ckpt)
    with pytest.raises(CamkdError) as e:
        load_teacher(str(ckpt))
    msg = str(e.value)
    assert "1 unexpected keys (e.g. extra.weight)" in msg, msg
    assert "1 keys with other shapes (e.g. conv1.weight: checkpoint [16, 1, 3, 3], model [16, 3, 3, 3])" in msg, msg
    assert "keys match" not in msg and "missing" not in msg, msg


def test_provenance_records_path_and_digest_but_identity_does_not(cli, teachers, tmp_path):
    base = dict(dataset="synthetic", limit=64, views=1, features=["none"], device="cpu", progress=False)
    path = tmp_path / "p.zarr"
    cache_teachers(CacheConfig(teachers=[str(teachers["resnet8"])], out=str(path), **base))
    meta = open_store(path).attrs["teachers"][0]
    assert meta["path"] == str(teachers["resnet8"]) and meta["checkpoint"] == "best.pth"
    info = cli("cache-info", path).output
    assert f"teacher t0 resnet8 {teachers['resnet8']} sha256 {sha256_file(teachers['resnet8'])[:12]} test top-1" in info, info
    # the same weights under another name and folder continue the same store
    moved = tmp_path / "elsewhere" / "renamed.pth"
    moved.parent.mkdir()
    shutil.copy(teachers["resnet8"], moved)
    s = cache_teachers(CacheConfig(teachers=[str(moved)], out=str(path), **dict(base, views=2)))
    assert s["rows_computed"] == 64
    assert open_store(path).attrs["teachers"][0]["path"] == str(teachers["resnet8"])  # provenance of the creation


# ---- 13. defaults, evaluation, report ------------------------------------------------------------

def test_defaults_store_penultimate_and_evaluate_with_a_small_batch(teachers, tmp_path, monkeypatch):
    from camkd import cache
    from camkd.store.config import batch_size_for

    calls = []
    real = cache.evaluate
    monkeypatch.setattr(cache, "evaluate", lambda model, data, **kw: calls.append(kw) or real(model, data, **kw))
    cfg = CacheConfig(teachers=[str(teachers["resnet8"])], dataset="synthetic", limit=64, device="cpu", progress=False,
                      out=str(tmp_path / "d.zarr"))
    assert cfg.features == ["penultimate"] and cfg.batch_size is None and cfg.evaluate
    assert batch_size_for(cfg, torch.device("cpu")) == 64 and batch_size_for(cfg, torch.device("cuda")) == 256
    s = cache_teachers(cfg)
    assert [c["batch_size"] for c in calls] == [64]
    assert s["layers"] == ["penultimate"] and list(open_store(tmp_path / "d.zarr").layers) == ["penultimate"]


def test_no_eval_records_no_accuracy(cli, teachers, tmp_path, monkeypatch):
    from camkd import cache

    def never(*a, **k):
        raise AssertionError("evaluated although evaluate=False")

    monkeypatch.setattr(cache, "evaluate", never)
    real = cache._load
    monkeypatch.setattr(cache, "_load", lambda cfg, split, device: never() if split == "test" else real(cfg, split, device))
    path = tmp_path / "n.zarr"
    cache_teachers(CacheConfig(teachers=[str(teachers["resnet8"])], dataset="synthetic", limit=64, device="cpu",
                               progress=False, evaluate=False, out=str(path)))
    a = open_store(path).attrs
    assert "test_accuracy" not in a["teachers"][0] and "teacher_test_accuracy" not in a
    info = cli("cache-info", path).output
    assert "test accuracy not evaluated" in info, info


def test_summary_names_the_methods_a_store_serves(rt, teachers, tmp_path):
    from camkd.cache import format_cache_summary
    from camkd.methods import list_methods

    _, summary = rt
    text = format_cache_summary(summary)
    assert "teacher top-1 on the cached training views (%): t0 resnet8, t1 wrn_16_1\n  view 0: " in text, text
    assert f"serves --method {', '.join(list_methods())}" in text.splitlines()[-1], text
    s = cache_teachers(CacheConfig(teachers=[str(teachers["resnet8"])], dataset="synthetic", limit=64, device="cpu",
                                   progress=False, evaluate=False, features=["none"], out=str(tmp_path / "n.zarr")))
    last = format_cache_summary(s).splitlines()[-1]
    assert "camkd (needs penultimate: -f penultimate)" in last and "fitnet (needs hint2: -f hint:2)" in last, last
    assert last.startswith("serves --method ") and "kd" in last.split(";")[0], last


def test_sizes_count_shards_and_show_per_sample_view(cli, rt):
    from camkd.store.sizes import array_sizes

    path, _ = rt
    sizes = array_sizes(zarr.open_group(str(path), mode="r"))
    for name in ("features/hint2/t0", "logits", "labels"):  # sharded, one chunk per block, plain
        on_disk = sum(f.stat().st_size for f in (path / name).rglob("*") if f.is_file())
        assert sizes[name] == on_disk > 0, name
    r = cli("cache-info", path)
    line = next(x for x in r.output.splitlines() if x.startswith("per sample-view"))
    assert "logits" in line and "features/hint2/t0" in line, line


# ---- 14. errors before output, one store format, what the report says ----------------------------

def test_refusals_come_before_the_plan(cli, teachers, small, tmp_path, one_error):
    """Without -q cache-teachers prints its plan; a target it refuses is refused first, alone."""
    path, args = small
    loud = [a for a in args if a != "-q"]
    a_file = tmp_path / "file.zarr"
    a_file.write_text("mine")
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *_replace_opt(loud, "--out", str(a_file))),
              r"file\.zarr exists and is not a camkd store")
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *_replace_opt(loud, "--dtype", "float32")),
              r"made differently: --dtype float16 in the store, float32 now")


def test_a_layer_the_teacher_lacks_is_named_as_given(cli, teachers, tmp_path, one_error):
    r = cli("cache-teachers", "-t", teachers["resnet8"], "-d", "synthetic", "--limit", "64", "-V", "1", "-f", "hint:99",
            "--device", "cpu", "--out", tmp_path / "s.zarr")
    one_error(r, r"^error: --features hint:99: resnet8 has only \d+ feature outputs")


def test_feature_dtype_without_features_is_refused(cli, teachers, tmp_path, one_error):
    r = cli("cache-teachers", "-t", teachers["resnet8"], "-d", "synthetic", "--limit", "64", "-V", "1", "-f", "none",
            "--feature-dtype", "int8", "--device", "cpu", "--out", tmp_path / "s.zarr")
    one_error(r, r"--feature-dtype int8 .* but -f none stores no features")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("options, suggested, not_suggested", [
    (["--dtype", "float16", "-V", "2"], ["fewer views (-V)", "--feature-dtype int8", "fewer features (-f)"], ["--dtype"]),
    (["--dtype", "float32", "-V", "1", "--feature-dtype", "int8"], ["float16 (--dtype)", "fewer features (-f)"],
     ["-V)", "--feature-dtype"]),
    (["--dtype", "float16", "-V", "1", "-f", "none"], [], ["cache ", "-V)", "--dtype", "-f)"]),
])
def test_space_error_suggests_only_what_shrinks_the_store(cli, teachers, tmp_path, monkeypatch, one_error, options,
                                                          suggested, not_suggested):
    from camkd.store import space

    monkeypatch.setattr(space, "free_bytes", lambda path: 1000)
    r = cli("cache-teachers", "-t", teachers["resnet8"], "-d", "synthetic", "--limit", "64", "--device", "cpu",
            "--out", tmp_path / "s.zarr", *options)
    line = one_error(r, r"s\.zarr needs .* more but .* has 1000 B free; free space, .*choose another --out")
    assert all(s in line for s in suggested) and not any(s in line for s in not_suggested), line


def _drop_attr(path: Path, key: str) -> None:
    g = zarr.open_group(str(path), mode="r+")
    attrs = dict(g.attrs["camkd"])
    del attrs[key]
    g.attrs["camkd"] = attrs


def test_stores_of_earlier_layouts_are_refused_with_the_rebuild_command(cli, teachers, small, tmp_path, one_error):
    path, args = small
    old = clone(path, tmp_path / "old.zarr")
    _drop_attr(old, "compressor")  # what a pre-release camkd wrote
    rebuild = rf"written by an earlier camkd \(a pre-release layout \(no compressor recorded\)\); .*rebuild it with " \
              rf"'camkd cache-teachers \.\.\. --out {re.escape(str(old))} --overwrite'"
    with pytest.raises(CamkdError, match=rebuild):
        open_store(old)
    one_error(cli("cache-info", old), rebuild)
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *_replace_opt(args, "--out", str(old))), rebuild)
    r = cli("cache-teachers", "-t", teachers["resnet8"], *_replace_opt(args, "--out", str(old)), "--overwrite")
    assert r.exit_code == 0, r.output
    assert_stores_equal(old, path)
    other = clone(path, tmp_path / "other.zarr")
    g = zarr.open_group(str(other), mode="r+")
    g.attrs["camkd"] = dict(g.attrs["camkd"], format_version=0)
    one_error(cli("cache-info", other), r"earlier camkd \(store format 0\); this camkd reads format 1 only: rebuild")


def test_report_sizes_in_a_unit_that_shows_them(rt):
    from camkd.cache import format_cache_summary
    from camkd.store.sizes import human

    assert [human(x) for x in (0, 1023, 20 * 1024, 5 * 2**20 + 2**19, 3 * 2**30, 2**50)] == \
        ["0 B", "1023 B", "20.0 KB", "5.5 MB", "3.0 GB", "1.0 PB"]
    _, summary = rt
    small = dict(summary, store_bytes=20 * 1024)
    assert "store size 20.0 KB;" in format_cache_summary(small)


def test_cache_teachers_and_cache_info_print_the_same_sizes(cli, teachers, tmp_path):
    """The same per sample-view figures, in the same (sorted) order, from the same function."""
    path = tmp_path / "z.zarr"
    r = cli("cache-teachers", "-t", teachers["resnet8"], "-t", teachers["wrn_16_1"], "-d", "synthetic", "--limit", "64",
            "-V", "1", "-f", "penultimate", "-f", "hint:1", "--compressor", "zstd", "--no-eval", "--device", "cpu", "-q",
            "--out", path)
    assert r.exit_code == 0, r.output
    made = next(x for x in r.output.splitlines() if x.startswith("store size ")).split("; per sample-view ")[1]
    info = cli("cache-info", path).output
    shown = next(x for x in info.splitlines() if x.startswith("per sample-view ")).removeprefix("per sample-view ")
    assert made == shown, (made, shown)
    names = [part.rsplit(" ", 2)[0] for part in shown.split("(", 1)[1].rstrip(")").split(", ")]
    assert names == sorted(names) and len(names) == 6, names  # aug, 4 features, logits


def test_evaluation_names_the_whole_test_split_once(teachers, tmp_path, monkeypatch):
    """Under torchrun each rank evaluates its slice; the main rank names the whole split, the others nothing."""
    from camkd import cache, dist
    from camkd.teachers import load_teachers

    said = []
    monkeypatch.setattr(cache, "log", said.append)
    cfg = CacheConfig(teachers=[str(teachers["resnet8"])], dataset="synthetic", limit=64, device="cpu", progress=True)
    loaded = load_teachers(cfg.teachers)
    n = len(cache._load(cfg, "test", torch.device("cpu")))
    accs = [cache.teacher_test_accuracy(cfg, loaded, torch.device("cpu"), 64, dist.World(rank=rank, size=2))
            for rank in (0, 1)]
    assert all(len(acc) == 1 for acc in accs)
    assert said == [f"evaluating 1 teacher on the synthetic test split ({n} images; --no-eval skips this)",
                    f"teacher test top-1 (%): {accs[0][0]:.2f}"], said
