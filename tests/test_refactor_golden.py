"""The issue-9 redesign preserves behaviour: cached distillation runs end with the same weights
as the code before it (tests/data/refactor_golden.json, made by tests/data/make_refactor_golden.py
at commit 6a257eb: per-tensor float64 sum and sum of squares of last.pth)."""

import contextlib
import json
from pathlib import Path

import pytest
import torch

from camkd.checkpoint import load_checkpoint
from camkd.config import OptimConfig, RunConfig
from camkd.distill import DistillConfig, distill
from camkd.models import create_model
from camkd.store.writer import CacheConfig, cache_teachers

GOLDEN = json.loads((Path(__file__).parent / "data" / "refactor_golden.json").read_text())


@contextlib.contextmanager
def two_threads():
    """The golden runs used 2 threads; the thread count changes float reductions (and so the weights)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with two_threads():
        return _make_store(tmp_path_factory)


def _make_store(tmp_path_factory):
    work = tmp_path_factory.mktemp("golden")
    specs = []
    for k, arch in enumerate(["resnet8", "resnet14"]):
        torch.manual_seed(100 + k)
        torch.save({"model": create_model(arch, num_classes=10, in_channels=3).state_dict()}, work / f"t{k}.pth")
        specs.append(f"{arch}={work / f't{k}.pth'}")
    path = work / "s.zarr"
    cache_teachers(CacheConfig(teachers=specs, dataset="synthetic", limit=256, views=2, seed=3, features=["penultimate"],
                               dtype="float32", out=str(path), device="cpu", progress=False))
    return path


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_final_weights_match_the_pre_refactor_code(name, store, tmp_path):
    with two_threads():
        _check(name, store, tmp_path)


def _check(name, store, tmp_path):
    method = "avg" if name == "avg" else "camkd"
    mb = 0.001 if name == "camkd_streamed" else 4096.0
    distill(DistillConfig(arch="resnet8", method=method, cache=str(store), feature_memory_mb=mb, window_blocks=2,
                          optim=OptimConfig(epochs=2, batch_size=32),
                          run=RunConfig(seed=5, device="cpu", out=str(tmp_path / name), deterministic=True, progress=False)))
    ck = load_checkpoint(tmp_path / name / "last.pth")
    got = {f"{part}.{k}": [float(v.double().sum()), float(v.double().pow(2).sum())]
           for part in ("model", "method") for k, v in ck[part].items() if v.is_floating_point()}
    assert got.keys() == GOLDEN[name].keys()
    for key, (s, q) in GOLDEN[name].items():
        assert got[key][0] == pytest.approx(s, rel=1e-6, abs=1e-9), key
        assert got[key][1] == pytest.approx(q, rel=1e-6, abs=1e-9), key
