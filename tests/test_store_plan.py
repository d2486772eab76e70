"""Size first: the planned store size equals what is written, a dry run writes nothing, and a store
that cannot fit is refused before any work (the disk-full tests in test_store.py use a real tmpfs)."""

import pytest
import torch

from camkd.cache import CacheConfig, cache_teachers
from camkd.models import create_model
from camkd.store.plan import plan_store
from camkd.store.sizes import array_sizes, human


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    work = tmp_path_factory.mktemp("plan")
    out = []
    for k, arch in enumerate(["resnet8", "wrn_16_1"]):
        torch.manual_seed(k)
        torch.save({"model": create_model(arch, num_classes=10, in_channels=3).state_dict()}, work / f"t{k}.pth")
        out.append(f"{arch}={work / f't{k}.pth'}")
    return out


@pytest.mark.parametrize("limit, features, dtype", [
    (200, ["penultimate"], "float16"),  # one unsharded chunk per view, a partial last chunk
    (700, ["penultimate", "hint:1"], "float32"),  # sharded arrays, several blocks, a partial last block
    (96, ["none"], "float32"),
])
def test_plan_equals_the_written_store(specs, tmp_path, limit, features, dtype):
    cfg = dict(teachers=specs, dataset="synthetic", limit=limit, views=2, features=features, dtype=dtype,
               out=str(tmp_path / "s.zarr"), device="cpu", progress=False, evaluate=False)
    dry = cache_teachers(CacheConfig(**cfg, dry_run=True))
    assert dry["dry_run"] and not (tmp_path / "s.zarr").exists()
    cache_teachers(CacheConfig(**cfg))
    import zarr

    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    attrs = g.attrs["camkd"]
    actual = array_sizes(g)
    shapes = {layer: [tuple(s) for s in spec["shapes"]] for layer, spec in attrs["features"].items()}
    plan = plan_store(n=limit, views=2, k=2, num_classes=10, dtype=dtype, shapes=shapes, block_rows=attrs["block_rows"])
    from camkd.store.plan import METADATA

    for name in ["labels", "aug", "logits"] + [n for n in plan.arrays if n.startswith("features/")]:
        meta = (tmp_path / "s.zarr" / name / "zarr.json").stat().st_size
        assert plan.arrays[name] - METADATA == actual[name] - meta, name  # exact but for the metadata document
        assert meta < 2 * METADATA  # the estimate of the one inexact term is of the right size
    assert abs(plan.total - sum(v for k, v in actual.items() if not k.startswith("heads/"))) < 4096
    assert any(line.startswith("  total") for line in dry["plan"])


def test_reference_protocol_size_matches_the_design_figure():
    """CIFAR-100, 240 views, 3 x resnet32x4 penultimate features (256 x 8 x 8) in float16: about 1.2 TB."""
    plan = plan_store(n=50000, views=240, k=3, num_classes=100, dtype="float16",
                      shapes={"penultimate": [(256, 8, 8)] * 3}, block_rows=256)
    feats = sum(v for k, v in plan.arrays.items() if k.startswith("features/"))
    assert 1.1e12 < feats < 1.25e12 and 7e9 < plan.arrays["logits"] < 7.5e9
    assert human(plan.total).endswith("TB")


def test_dry_run_prints_the_plan_and_writes_nothing(cli, specs, tmp_path):
    r = cli("cache-teachers", "-t", specs[0], "-d", "synthetic", "--limit", "128", "-V", "3", "--device", "cpu",
            "--out", tmp_path / "s.zarr", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "planned store: 3 views x 128 samples" in r.output and "free at" in r.output
    assert not (tmp_path / "s.zarr").exists()


def test_cli_feature_dtype_and_compressor(cli, specs, tmp_path):
    r = cli("cache-teachers", "-t", specs[0], "-d", "synthetic", "--limit", "128", "-V", "1", "--device", "cpu", "-q",
            "--no-eval", "--feature-dtype", "int8", "--compressor", "zstd", "--out", tmp_path / "s.zarr")
    assert r.exit_code == 0, r.output
    import zarr

    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert str(g["features/penultimate/t0"].dtype) == "int8" and "features/penultimate/t0_scale" in g
    assert g.attrs["camkd"]["compressor"] == "zstd"
