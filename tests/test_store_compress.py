"""Feature compression (issue 11): int8 features with a per-(sample, channel) scale, and zstd.

One tiny seeded resnet8 teacher (passed as resnet8=PATH), synthetic data, stores written in-process, CPU.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from camkd.cache import CacheConfig, cache_teachers, cache_verify
from camkd.errors import CamkdError
from camkd.models import create_model
from camkd.store import layout, open_store
from camkd.store.plan import plan_store
from camkd.store.reader import FeatureStream
from camkd.store.sizes import array_sizes

N = 256
BASE = dict(dataset="synthetic", limit=N, views=2, aug_seed=3, features=["penultimate", "hint:1"], device="cpu",
            progress=False, evaluate=False, batch_size=64)
KINDS = {
    "f32": dict(dtype="float32"),
    "f16": dict(dtype="float16"),
    "i8": dict(dtype="float32", feature_dtype="int8"),
    "i8z": dict(dtype="float32", feature_dtype="int8", compressor="zstd"),
    "f32z": dict(dtype="float32", compressor="zstd"),
}


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("teacher") / "t.pth"
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8", num_classes=10, in_channels=3).state_dict()}, path)
    return f"resnet8={path}"


@pytest.fixture(scope="module")
def stores(spec, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for name, kw in KINDS.items():
        out[name] = root / f"{name}.zarr"
        cache_teachers(CacheConfig(teachers=[spec], out=str(out[name]), **BASE, **kw))
    return out


def _view_sizes(path: Path, prefix: str = "") -> int:
    sizes = array_sizes(zarr.open_group(str(path), mode="r"))
    return sum(v for k, v in sizes.items() if k.startswith(prefix or ("aug", "logits", "features/")))


def test_int8_round_trip_within_half_a_step(stores):
    f32, i8 = open_store(stores["f32"]), open_store(stores["i8"])
    assert i8.feature_dtype == "int8" and f32.feature_dtype == "float32"
    for v in range(2):
        assert np.array_equal(f32.logits(v).numpy(), i8.logits(v).numpy())  # logits untouched
        for layer in ("penultimate", "hint1"):
            ref, got = f32.features(layer, v)[0], i8.features(layer, v)[0]
            assert got.dtype == np.float32 and got.shape == ref.shape
            scale = np.asarray(i8.g[layout.scale_path(layer, 0)][v])
            assert scale.dtype == np.float32 and scale.shape == ref.shape[:2]
            bound = scale[..., None, None] / 2 * (1 + 1e-5) + 1e-7
            assert (np.abs(got - ref) <= bound).all(), (layer, v, float(np.abs(got - ref).max()))
            # the stored integers are exactly the formula applied to the float32 store's values
            q, s = layout.quantize(ref)
            assert np.array_equal(np.asarray(i8.g[layout.feature_path(layer, 0)][v]), q) and np.array_equal(s, scale)
            # a row range reads the same as the whole view
            assert np.array_equal(i8.features(layer, v, slice(64, 192))[0], got[64:192])


def test_feature_stream_dequantizes(stores):
    i8 = open_store(stores["i8"])
    rows = np.random.default_rng(0).permutation(N)
    whole = i8.features("penultimate", 1)[0]
    seen = 0
    for idx, feats in FeatureStream(i8, ("penultimate",), 1, [rows[:100], rows[100:]]):
        assert feats["penultimate"][0].dtype == np.float32
        assert np.array_equal(feats["penultimate"][0], whole[idx])
        seen += len(idx)
    assert seen == N
    assert i8.feature_bytes_per_view(("penultimate",)) == open_store(stores["f32"]).feature_bytes_per_view(("penultimate",))


def test_int8_attrs_layout_and_size(stores):
    g = zarr.open_group(str(stores["i8"]), mode="r")
    a = g.attrs["camkd"]
    assert a["feature_dtype"] == "int8" and a["feature_scale"] == "per sample and channel, max-abs / 127"
    assert a["compressor"] == "none" and a["dtype"] == "float32"
    q, s = g["features/penultimate/t0"], g["features/penultimate/t0_scale"]
    assert q.dtype == np.int8 and s.dtype == np.float32
    assert tuple(s.metadata.dimension_names) == ("view", "sample", "channel") and s.shape == q.shape[:3]
    assert layout.object_rows(s) == layout.object_rows(q) == a["block_rows"]  # one object per writer unit, as the others
    f32 = _view_sizes(stores["f32"], "features/")
    i8_q = sum(v for k, v in array_sizes(g).items() if k.startswith("features/") and not k.endswith("_scale"))
    assert 3.8 < f32 / i8_q < 4.05, (f32, i8_q)
    assert f32 / _view_sizes(stores["i8"], "features/") > 3.5  # scales included


def test_zstd_decodes_identically_and_is_not_larger(stores):
    for plain, packed in (("f32", "f32z"), ("i8", "i8z")):
        ga, gb = zarr.open_group(str(stores[plain]), mode="r"), zarr.open_group(str(stores[packed]), mode="r")
        names = [n for n, _ in ga.members(max_depth=None) if isinstance(ga[n], zarr.Array)]
        for name in names:
            u, v = np.asarray(ga[name][...]), np.asarray(gb[name][...])
            assert u.dtype == v.dtype and np.array_equal(u.view(np.uint8), v.view(np.uint8)), name
        assert gb.attrs["camkd"]["compressor"] == "zstd" and "compression" in gb.attrs["camkd"]
        assert _view_sizes(stores[packed]) <= _view_sizes(stores[plain])
        # zstd, then the checksum over the compressed bytes (inside the shard when sharded)
        for name in ("logits", "features/hint1/t0"):
            codecs = gb[name].metadata.codecs
            inner = getattr(codecs[0], "codecs", codecs)
            kinds = [type(c).__name__ for c in inner]
            assert kinds[-2:] == ["ZstdCodec", "Crc32cCodec"], kinds
        assert [type(c).__name__ for c in gb["labels"].metadata.codecs][-1] == "Crc32cCodec"


def test_bytes_per_sample_view_order(stores):
    per = {k: _view_sizes(stores[k]) / (N * 2) for k in ("f16", "i8", "i8z")}
    assert per["i8z"] <= per["i8"] < per["f16"], per


def test_verify_int8_passes_and_reports_a_damaged_scale(spec, stores, tmp_path):
    rep = cache_verify(stores["i8"], [spec], sample=48, device="cpu")
    assert rep.ok and rep.lines[-1] == "verdict: OK", rep.lines
    assert any(line.startswith("features/penultimate/t0: largest difference") for line in rep.lines)
    rep = cache_verify(stores["i8z"], [spec], sample=16, device="cpu")
    assert rep.ok, rep.lines
    bad = tmp_path / "bad.zarr"
    shutil.copytree(stores["i8"], bad, copy_function=os.link)
    s = zarr.open_group(str(bad), mode="r")["features/hint1/t0_scale"]
    f = bad / layout.object_key(s, (1, 0, 0))
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0xFF
    f.unlink()
    f.write_bytes(bytes(data))
    rep = cache_verify(bad, [spec], sample=16, device="cpu")
    assert not rep.ok and rep.corrupt_blocks == [(1, 0)], rep.lines
    assert "features/hint1/t0_scale view 1" in rep.lines[1] and rep.lines[-1].startswith("verdict: CORRUPT"), rep.lines


def test_verify_int8_catches_wrong_values(spec, stores, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(stores["i8"], bad)
    g = zarr.open_group(str(bad), mode="r+")
    s = np.asarray(g["features/penultimate/t0_scale"][0])
    g["features/penultimate/t0_scale"][0] = s * np.float32(1.05)  # valid checksums, values off by more than a step
    rep = cache_verify(bad, [spec], sample=32, device="cpu")
    assert not rep.ok and any("MISMATCH: features/penultimate/t0 view 0" in line for line in rep.lines), rep.lines


def test_resume_with_another_feature_dtype_or_compressor_is_refused(spec, stores, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(stores["i8"], path)
    with pytest.raises(CamkdError, match=r"made differently: --feature-dtype int8 in the store, float32 now; use"):
        cache_teachers(CacheConfig(teachers=[spec], out=str(path), **BASE, dtype="float32"))
    with pytest.raises(CamkdError, match=r"made differently: --compressor none in the store, zstd now; use"):
        cache_teachers(CacheConfig(teachers=[spec], out=str(path), **BASE, **KINDS["i8z"]))
    # the same options continue it (nothing left to do)
    summary = cache_teachers(CacheConfig(teachers=[spec], out=str(path), **BASE, **KINDS["i8"]))
    assert summary["complete"]
    with pytest.raises(CamkdError, match="--feature-dtype"):
        cache_teachers(CacheConfig(teachers=[spec], out=str(tmp_path / "x.zarr"), **BASE, feature_dtype="int4"))
    with pytest.raises(CamkdError, match="--compressor"):
        cache_teachers(CacheConfig(teachers=[spec], out=str(tmp_path / "x.zarr"), **BASE, compressor="lz4"))


@pytest.mark.parametrize("limit, compressor", [(200, "none"), (700, "none"), (200, "zstd")])
def test_plan_exact_for_int8(spec, tmp_path, limit, compressor):
    cfg = dict(BASE, teachers=[spec], limit=limit, dtype="float16", feature_dtype="int8", compressor=compressor,
               out=str(tmp_path / "s.zarr"))
    dry = cache_teachers(CacheConfig(**cfg, dry_run=True))
    assert ("(about: the view x sample arrays uncompressed" in dry["plan"][0]) == (compressor == "zstd"), dry["plan"][0]
    cache_teachers(CacheConfig(**cfg))
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    attrs = g.attrs["camkd"]
    actual = array_sizes(g)
    shapes = {layer: [tuple(s) for s in sp["shapes"]] for layer, sp in attrs["features"].items()}
    plan = plan_store(n=limit, views=2, k=1, num_classes=10, dtype="float16", shapes=shapes,
                      block_rows=attrs["block_rows"], feature_dtype="int8", compressor=compressor)
    names = [n for n in actual if n.startswith(("aug", "logits", "features/"))]
    assert (limit == 700) == any(g[n].shards is not None for n in names)  # 700: sharded features
    assert set(names) == {n for n in plan.arrays if n.startswith(("aug", "logits", "features/"))}
    assert any(n.endswith("_scale") for n in names)
    for name in ["labels"] + names:
        if compressor == "none" or name == "labels":
            assert plan.arrays[name] == actual[name], name  # exact, metadata included
        else:
            assert plan.arrays[name] >= actual[name], name  # these features compress


def test_distill_from_an_int8_store(stores, tmp_path):
    from camkd.config import DataConfig, OptimConfig, RunConfig
    from camkd.distill import DistillConfig, distill

    cfg = DistillConfig(arch="resnet8", method="camkd", cache=str(stores["i8"]), data=DataConfig(dataset=None),
                        optim=OptimConfig(epochs=2, batch_size=32),
                        run=RunConfig(device="cpu", out=str(tmp_path / "run"), progress=False))
    summary = distill(cfg)
    assert summary is not None
    assert (tmp_path / "run").is_dir()
