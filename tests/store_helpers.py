"""Helpers and fixtures the tests/test_store_*.py files share (the fixtures reach them through conftest.py).

Real Zarr stores on disk, synthetic data, two tiny untrained teachers made once per session, CPU.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from camkd.cache import CacheConfig, cache_teachers
from camkd.cli import app
from camkd.models import create_model

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


def files(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def replace_opt(args, opt, value):
    args = list(args)
    if opt in args:
        args[args.index(opt) + 1] = value
    else:
        args += [opt, value]
    return args


def rt_teacher_args(teachers):
    return ["-t", teachers["resnet8"], "-t", teachers["wrn_16_1"]]


def read_progress(path: Path):
    try:
        return np.asarray(zarr.open_array(str(path / "progress"), mode="r")[...])
    except Exception:  # not created yet
        return None


def cache_cmd(teachers, out: Path, views: int = 2) -> list[str]:
    """resnet8 with penultimate + hint:1 in float32: ~80 KB a row -> blocks of 256 rows, per view 256 + 128 (~30 MB)."""
    return [sys.executable, "-m", "camkd.cli", "cache-teachers", "-t", str(teachers["resnet8"]), "-d", "synthetic",
            "--limit", "384", "-V", str(views), "-f", "penultimate", "-f", "hint:1", "--dtype", "float32",
            "--batch-size", "128", "--device", "cpu", "-q", "--out", str(out)]


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def rt(teachers, tmp_path_factory):
    """The round-trip store: resnet8 + wrn_16_1, V=2, penultimate + hint:2, float32, N=320 (made in-process)."""
    path = tmp_path_factory.mktemp("rt") / "s.zarr"
    summary = cache_teachers(CacheConfig(teachers=[str(teachers["resnet8"]), str(teachers["wrn_16_1"])], out=str(path), **RT))
    return path, summary


@pytest.fixture(scope="session")
def small(teachers, tmp_path_factory):
    """A store made by the CLI, and the arguments that made it."""
    path = tmp_path_factory.mktemp("small") / "s.zarr"
    args = ["-d", "synthetic", "--limit", "128", "-V", "1", "-f", "penultimate", "--dtype", "float16", "--device", "cpu",
            "-q", "--out", str(path)]
    r = CliRunner().invoke(app, ["cache-teachers", "-t", str(teachers["resnet8"]), *args])
    assert r.exit_code == 0, r.output
    return path, args


@pytest.fixture(scope="session")
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
