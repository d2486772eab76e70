"""Streamed features (issue 24): blocks decoded once into one buffer, rows gathered once, int8 dequantized in torch
on the device; the values equal the whole view's bit for bit. One tiny seeded resnet8 teacher, stores written
in-process, CPU (the CUDA case runs where a GPU is, marked ``cuda``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camkd.cache import CacheConfig, cache_teachers
from camkd.data.order import epoch_order
from camkd.epoch_plan import EpochPlan
from camkd.models import create_model
from camkd.sources import StoreTeachers
from camkd.store import layout, open_store
from camkd.store.reader import BufferPool, FeatureStream, Rows, dequantize_torch

N = 600  # not a multiple of the block rows: the last block is partial
LAYERS = ("penultimate", "hint1")
BASE = dict(dataset="synthetic", limit=N, views=2, aug_seed=1, features=["penultimate", "hint:1"], device="cpu",
            progress=False, evaluate=False, batch_size=64)
KINDS = {"f16": dict(dtype="float16"), "i8": dict(dtype="float32", feature_dtype="int8")}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stream")
    specs = []
    for k in range(2):
        torch.manual_seed(k)
        torch.save({"model": create_model("resnet8", num_classes=10, in_channels=3).state_dict()}, root / f"t{k}.pth")
        specs.append(f"resnet8={root / f't{k}.pth'}")
    out = {}
    for name, kw in KINDS.items():
        out[name] = root / f"{name}.zarr"
        cache_teachers(CacheConfig(teachers=specs, out=str(out[name]), **BASE, **kw))
    return out


def _bits(a: torch.Tensor) -> torch.Tensor:
    return a.contiguous().view(torch.int32)


def test_dequantize_in_torch_equals_numpy_bit_for_bit():
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(64, 8, 3, 3)).astype(np.int8)
    q[0], q[1] = 127, -127
    scale = rng.random((64, 8)).astype(np.float32) * np.float32(3.0)
    scale[2] = 1e-40  # subnormal: products underflow
    scale[3] = 2e36  # products near float32's largest
    scale[4] = 1  # a zero channel's scale
    scale[5] = np.float32(1 / 3)  # a product that rounds
    x = rng.standard_normal((64, 8, 3, 3)).astype(np.float32)
    for qq, ss in ((q, scale), layout.quantize(x)):
        ref = layout.dequantize(qq, ss)
        got = dequantize_torch(torch.from_numpy(qq), torch.from_numpy(ss))
        assert got.dtype == torch.float32
        assert torch.equal(_bits(got), _bits(torch.from_numpy(ref)))
    other = dequantize_torch(torch.from_numpy(q), torch.from_numpy(scale * 2))
    assert not torch.equal(other, torch.from_numpy(layout.dequantize(q, scale)))  # the comparison can fail


def _window_sets(store) -> list[list[np.ndarray]]:
    rows = np.random.default_rng(3).permutation(store.n).astype(np.int64)
    return [epoch_order(store.n, seed=0, epoch=2, block_rows=store.block_rows, window_blocks=1),
            [rows[:7], rows[7:450], rows[450:]]]  # windows that are not whole blocks


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("prefetch", [1, 3])
def test_streamed_tensors_equal_the_whole_view(stores, kind, prefetch):
    store = open_store(stores[kind])
    whole = {layer: store.features(layer, 1) for layer in LAYERS}
    for windows in _window_sets(store):
        seen = 0
        for idx, feats in FeatureStream(store, LAYERS, 1, windows, prefetch=prefetch, device="cpu"):
            for layer in LAYERS:
                for t, rows in enumerate(feats[layer]):
                    ref = torch.from_numpy(whole[layer][t][idx])
                    assert isinstance(rows, Rows) and len(rows) == len(idx)
                    a = rows.gather()
                    assert a.dtype == ref.dtype == (torch.float32 if kind == "i8" else torch.float16)
                    assert torch.equal(a, ref), (kind, layer, t)
                    cut = Rows.cat([rows[5:9], rows[: len(idx) // 2]]).gather()  # slices of the positions, joined
                    assert torch.equal(cut, torch.cat([ref[5:9], ref[: len(idx) // 2]]))
            seen += len(idx)
        assert seen == store.n
        # the host API yields numpy arrays, the same values
        for idx, feats in FeatureStream(store, LAYERS, 1, windows, prefetch=prefetch):
            assert all(np.array_equal(feats[layer][t], whole[layer][t][idx]) for layer in LAYERS for t in range(2))


@pytest.mark.parametrize("kind", list(KINDS))
def test_buffers_are_reused_and_never_overwritten_while_held(stores, kind):
    store = open_store(stores[kind])
    whole = store.features("hint1", 0)
    windows = epoch_order(store.n, seed=0, epoch=1, block_rows=store.block_rows, window_blocks=1)
    pool = BufferPool()
    # a consumer that keeps every window: the pool makes more buffers, the rows stay right
    kept = list(FeatureStream(store, ("hint1",), 0, windows, prefetch=1, device="cpu", buffers=pool))
    assert len({rows.pieces[0][0][0].data_ptr() for _, f in kept for rows in f["hint1"]}) == len(windows) * 2
    for idx, feats in kept:
        assert all(torch.equal(rows.gather(), torch.from_numpy(whole[t][idx])) for t, rows in enumerate(feats["hint1"]))
    del kept, idx, feats
    assert sum(len(v) for v in pool._free.values()) == len(windows)  # every buffer given back
    # the next epoch reads into them again
    first = None
    for idx, feats in FeatureStream(store, ("hint1",), 0, windows[::-1], prefetch=1, device="cpu", buffers=pool):
        first = first or feats["hint1"][0].pieces[0][0][0].data_ptr()
        assert all(torch.equal(rows.gather(), torch.from_numpy(whole[t][idx])) for t, rows in enumerate(feats["hint1"]))
    assert sum(len(v) for v in pool._free.values()) == len(windows) - 1  # the last window's rows are still held
    del idx, feats
    ptrs = {buf["hint1"][0][0].data_ptr() for bufs in pool._free.values() for buf in bufs}
    assert first in ptrs and sum(len(v) for v in pool._free.values()) == len(windows)


@pytest.mark.parametrize("kind", list(KINDS))
def test_store_source_streams_batches_across_windows_as_the_whole_view(stores, kind):
    store = open_store(stores[kind])
    whole = StoreTeachers(store, LAYERS, torch.device("cpu"), memory_budget_mb=1e6)
    streamed = StoreTeachers(store, LAYERS, torch.device("cpu"), memory_budget_mb=0, window_blocks=1)
    assert whole.window_blocks is None and streamed.window_blocks == 1
    plan = EpochPlan.of(store.n, seed=4, epoch=2, views=store.views, batch_size=48, drop_last=False,
                        block_rows=store.block_rows, window_blocks=1)
    assert len(plan.windows) > 1 and any(s // store.block_rows != (s + 47) // store.block_rows for s in plan.starts)
    mem = EpochPlan.of(store.n, seed=4, epoch=2, views=store.views, batch_size=48, drop_last=False,
                       block_rows=store.block_rows, window_blocks=1)
    batches = 0
    for idx, data, _ in zip(plan.batches, streamed.batches(plan), whole.batches(mem)):
        i = torch.from_numpy(idx)
        x = torch.zeros(len(idx), 1)
        a, b = streamed.teacher_outputs(i, x, data), whole.teacher_outputs(i, x, {})
        for layer in LAYERS:
            for fa, fb in zip(a.features[layer], b.features[layer]):
                assert fa.dtype == torch.float32 and torch.equal(_bits(fa), _bits(fb)), (kind, layer)
        batches += 1
    assert batches == len(plan.batches) == 13


@pytest.mark.cuda
@pytest.mark.parametrize("kind", list(KINDS))
def test_streamed_on_cuda_equal_the_whole_view(stores, kind):
    store = open_store(stores[kind])
    whole = {layer: store.features(layer, 0) for layer in LAYERS}
    for windows in _window_sets(store):
        for idx, feats in FeatureStream(store, LAYERS, 0, windows, device="cuda"):
            for layer in LAYERS:
                for t, rows in enumerate(feats[layer]):
                    a = rows.gather()
                    assert a.is_cuda and torch.equal(a.cpu(), torch.from_numpy(whole[layer][t][idx])), (kind, layer, t)


@pytest.mark.cuda
def test_dequantize_on_cuda_equals_numpy_bit_for_bit():
    q, scale = layout.quantize(np.random.default_rng(1).standard_normal((64, 8, 3, 3)).astype(np.float32))
    scale[0] = 1e-40  # subnormal products: no flush to zero on the device
    got = dequantize_torch(torch.from_numpy(q).cuda(), torch.from_numpy(scale).cuda()).cpu()
    assert torch.equal(_bits(got), _bits(torch.from_numpy(layout.dequantize(q, scale))))
