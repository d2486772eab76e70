"""Size first: the planned store size equals what is written, a dry run writes nothing, and a store
that cannot fit is refused before any work (the disk-full tests in test_store_space.py use a real tmpfs)."""

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from camkd.cache import CacheConfig, cache_teachers
from camkd.models import create_model
from camkd.store import layout, topk
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


def plan_of(path) -> tuple[dict, dict]:
    """The plan of a written store, from its own attrs, labels, file listing and heads; and its arrays' sizes."""
    g = zarr.open_group(str(path), mode="r")
    attrs = g.attrs["camkd"]
    sizes = array_sizes(g)
    samples = {"labels": np.asarray(g["labels"][:])} | {n: np.asarray(g[n][:]) for n in sizes if n.startswith("files/")}
    heads = [{n.split("/")[-1]: np.asarray(g[n][...]) for n in sizes if n.startswith(f"heads/t{t}/")}
             for t in range(len(attrs["teachers"]))]
    shapes = {layer: [tuple(s) for s in spec["shapes"]] for layer, spec in attrs["features"].items()}
    plan = plan_store(n=len(samples["labels"]), views=attrs["views"], k=len(attrs["teachers"]),
                      num_classes=attrs["dataset"]["num_classes"], dtype=attrs["dtype"], shapes=shapes,
                      block_rows=attrs["block_rows"], feature_dtype=attrs["feature_dtype"], compressor=attrs["compressor"],
                      logits=topk.LogitsSpec.from_attrs(attrs), aug=layout.aug_layout(attrs["augmentation"]),
                      samples=samples, heads=heads)
    return plan.arrays, sizes


@pytest.mark.parametrize("limit, features, dtype", [
    (200, ["penultimate"], "float16"),  # one unsharded chunk per view, a partial last chunk
    (700, ["penultimate", "hint:1"], "float32"),  # sharded arrays, several blocks, a partial last block
    (96, ["none"], "float32"),
])
def test_plan_equals_the_written_store(specs, tmp_path, limit, features, dtype):
    """Every array, heads and metadata included, to the byte; the dry run's 'still to write' is the store's size."""
    cfg = dict(teachers=specs, dataset="synthetic", limit=limit, views=2, features=features, dtype=dtype,
               out=str(tmp_path / "s.zarr"), device="cpu", progress=False, evaluate=False)
    dry = cache_teachers(CacheConfig(**cfg, dry_run=True))
    assert dry["dry_run"] and not (tmp_path / "s.zarr").exists()
    cache_teachers(CacheConfig(**cfg))
    planned, actual = plan_of(tmp_path / "s.zarr")
    assert planned == actual
    assert any(name.startswith("heads/") for name in actual)
    assert dry["plan"][-1].endswith(f"still to write: {human(sum(actual.values()))}"), dry["plan"][-1]
    assert "(the size it will have: every array, its metadata included)" in dry["plan"][0]
    assert any(line.startswith("  heads/*") for line in dry["plan"]) and any(line.startswith("  total") for line in dry["plan"])


def _image(rng: np.random.Generator, label: int) -> Image.Image:
    """A non-square image: the class's colour plus noise, 40-90 px on each side (as tests/folder_helpers.py)."""
    h, w = (int(v) for v in rng.integers(40, 91, size=2))
    colour = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][label], dtype=np.float64)
    return Image.fromarray(np.clip(colour + rng.normal(0, 30, size=(h, w, 3)), 0, 255).astype(np.uint8))


def test_plan_equals_a_written_image_folder_store(tmp_path):
    """An image folder's store adds [V, N, 5] int32 boxes, [V, N] uint32 pixel hashes and the file listing."""
    rng = np.random.default_rng(0)
    for label, cls in enumerate(("ant", "bee", "cat")):
        for split, count in (("train", 5), ("val", 2)):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(count):
                _image(rng, label).save(tmp_path / "data" / split / cls / f"{cls}_{i}.{'png' if i % 2 else 'jpg'}")
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8", num_classes=3, in_channels=3).state_dict()}, tmp_path / "t.pth")
    cfg = dict(teachers=[f"resnet8={tmp_path / 't.pth'}"], dataset="imagefolder", data_dir=str(tmp_path / "data"),
               views=2, out=str(tmp_path / "s.zarr"), device="cpu", progress=False, evaluate=False,
               options={"image_size": 32, "workers": 0})
    dry = cache_teachers(CacheConfig(**cfg, dry_run=True))
    cache_teachers(CacheConfig(**cfg))
    planned, actual = plan_of(tmp_path / "s.zarr")
    assert planned == actual
    assert {"aug", "pixels", "files/path", "files/size", "files/label"} <= set(actual)
    assert dry["plan"][-1].endswith(f"still to write: {human(sum(actual.values()))}"), dry["plan"][-1]


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
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert str(g["features/penultimate/t0"].dtype) == "int8" and "features/penultimate/t0_scale" in g
    assert g.attrs["camkd"]["compressor"] == "zstd"


def test_extending_a_complete_store_plans_its_new_views(specs, tmp_path):
    """-V 2 on a complete 1-view store: the plan is of 2 views, and what is still to write is the new view."""
    cfg = dict(teachers=specs[:1], dataset="synthetic", limit=64, features=["none"], out=str(tmp_path / "s.zarr"),
               device="cpu", progress=False, evaluate=False)
    cache_teachers(CacheConfig(**cfg, views=1))
    before = sum(array_sizes(zarr.open_group(str(tmp_path / "s.zarr"), mode="r")).values())
    dry = cache_teachers(CacheConfig(**cfg, views=2, dry_run=True))
    cache_teachers(CacheConfig(**cfg, views=2))
    after = sum(array_sizes(zarr.open_group(str(tmp_path / "s.zarr"), mode="r")).values())
    assert dry["plan"][0].startswith("planned store: 2 views x 64 samples"), dry["plan"]
    assert after > before and dry["plan"][-1].endswith(f"still to write: {human(after - before)}"), dry["plan"][-1]
    assert dry["plan"][-2].endswith(f"{human(after)}  ({after / 128:,.0f} B per sample-view)"), dry["plan"][-2]


def test_fewer_views_than_stored_say_so(cli, specs, tmp_path):
    """A complete store: one line, nothing computed; an unfinished one is filled, saying -V below its views does
    nothing."""
    args = ["-t", specs[0], "-d", "synthetic", "--limit", "64", "-f", "none", "--device", "cpu", "--no-eval",
            "--out", tmp_path / "s.zarr"]
    assert cli("cache-teachers", *args, "-V", "3", "-q").exit_code == 0
    r = cli("cache-teachers", *args, "-V", "1")
    assert r.exit_code == 0 and r.output.strip().splitlines() == [
        f"{tmp_path / 's.zarr'} is complete (3 views x 64 samples): nothing to compute; -V 1 is below its 3 views and "
        "changes nothing (a larger -V adds views)"], r.output
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    g["progress"][2, 0] = 0  # view 2 unwritten, as after a kill
    r = cli("cache-teachers", *args, "-V", "1", "-q")
    assert r.exit_code == 0 and f"{tmp_path / 's.zarr'} has 3 views; -V 1 below that changes nothing" in r.output, r.output
    assert "cached 64 sample-views" in r.output and zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["progress"][:].all()
