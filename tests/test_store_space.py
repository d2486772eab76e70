"""Room on disk: the space check's advice names only what shrinks the store, and a disk that fills up (a real
tmpfs) leaves whole blocks and a store the same command resumes.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from store_helpers import arrays, assert_stores_equal, cache_cmd, read_progress, replace_opt

from camkd.store import layout


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


# ---- disk full -----------------------------------------------------------------------------------

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
    flags = read_progress(path)
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
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *replace_opt(args, "--out", str(path)),
                           "--no-space-check"), rf"^error: cannot create {re.escape(str(path))}: disk full$")
    assert not list(tiny_disk.iterdir())
