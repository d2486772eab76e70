"""Damaged stores and cache-verify: corrupt, truncated and deleted chunks are named, tampered values fail the
recomputation, unfinished is not corrupt, --repair then the same run gives the undamaged store byte for byte.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import zarr
from store_helpers import N_RT, RT, chunk_file, clone, files, rewrite, rt_teacher_args

from camkd.cache import CacheConfig, cache_teachers
from camkd.errors import CamkdError
from camkd.store import open_store

# ---- corrupted and truncated chunks --------------------------------------------------------------

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


# ---- cache-verify --------------------------------------------------------------------------------

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


# ---- unfinished is not corrupt; repair; no teachers ----------------------------------------------

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
