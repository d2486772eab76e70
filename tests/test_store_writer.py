"""Writing a store: round trip, plain-zarr readability, bit-identical resume after kill -9 or an interrupted
creation, appended views.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from helpers import kill_while_writing
from store_helpers import N_RT, RT, arrays, assert_stores_equal, cache_cmd, clone, read_progress, replace_opt

from camkd.cache import CacheConfig, cache_teachers
from camkd.checkpoint import sha256_file
from camkd.data import load_dataset
from camkd.data.augspec import AugSpec
from camkd.data.views import augment, view_params
from camkd.models import create_model
from camkd.store import Expect, layout, open_store
from camkd.teachers import stored_heads


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

def test_resume_after_sigkill_is_bit_identical(teachers, uninterrupted, tmp_path):
    def views_of(attempt: int) -> int:
        return 2 if attempt < 3 else 6  # from the fourth try on more work, if it kept finishing before the kill

    def start(attempt: int):
        killed = tmp_path / f"killed{attempt}.zarr"
        cmd = cache_cmd(teachers, killed, views_of(attempt))
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), killed

    attempt, killed, after = kill_while_writing(start, read_progress, attempts=5)
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
    args = ["cache-teachers", "-t", teachers["resnet8"], *replace_opt(args, "--out", str(out))]
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
    r = cli("cache-teachers", "-t", teachers["resnet8"], *replace_opt(args, "--out", str(copy)))
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
