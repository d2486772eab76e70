"""Reading a store: epoch plans of whole blocks, the streaming feature reader, open_store's expectations."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zarr
from store_helpers import chunk_file, clone, rewrite

from camkd.data import load_dataset
from camkd.data.order import epoch_order as epoch_windows
from camkd.errors import CamkdError
from camkd.store import Expect, layout, open_store
from camkd.store.reader import FeatureStream

# ---- epoch plans and streaming -------------------------------------------------------------------

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


# ---- open_store expectations ---------------------------------------------------------------------

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
