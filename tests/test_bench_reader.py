"""`camkd bench reader` (issue 24) on a tiny store: it runs and writes its JSON with finite positive rates and their
ratio (no timed assertion: the ratio is a benchmark's figure)."""

from __future__ import annotations

import json
import math

import torch

from camkd.cache import CacheConfig, cache_teachers
from camkd.models import create_model


def test_bench_reader_writes_rates_and_their_ratio(cli, tmp_path):
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8", num_classes=10, in_channels=3).state_dict()}, tmp_path / "t.pth")
    store = tmp_path / "s.zarr"
    cache_teachers(CacheConfig(teachers=[f"resnet8={tmp_path / 't.pth'}"], dataset="synthetic", limit=300, views=1,
                               features=["penultimate"], device="cpu", out=str(store), progress=False, evaluate=False))
    r = cli("bench", "reader", "--cache", str(store), "--rounds", "2", "--images-per-s", "1000", "--device", "cpu",
            "--out", str(tmp_path / "r"))
    assert r.exit_code == 0, r.output
    assert "plain zarr, whole view" in r.output and "ratio streamed / plain" in r.output
    got = json.loads((tmp_path / "r.json").read_text())
    for key in ("plain_zarr_MB_per_s", "streamed_MB_per_s", "ratio", "needed_MB_per_s", "host_side_MB_per_s",
                "host_side_ratio"):
        assert math.isfinite(got[key]) and got[key] > 0, key
    assert got["ratio"] == got["streamed_MB_per_s"] / got["plain_zarr_MB_per_s"]
    assert got["host_side_ratio"] == got["host_side_MB_per_s"] / got["plain_zarr_MB_per_s"]
    assert "host side only" in r.output
    assert got["needed_MB_per_s"] == got["store"]["bytes_per_sample_view"] * 1000 / 2**20


def test_bench_reader_refuses_a_missing_store(cli, one_error, tmp_path):
    one_error(cli("bench", "reader", "--cache", str(tmp_path / "none.zarr")), r"not found")
