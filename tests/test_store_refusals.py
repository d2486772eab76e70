"""Refusals of cache-teachers: a store made differently names the difference, a path that is no store, options
that cannot apply, stores of earlier layouts; each before any work and without touching the store.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import zarr
from store_helpers import assert_stores_equal, clone, replace_opt, snapshot

from camkd.cache import CacheConfig, cache_teachers
from camkd.checkpoint import sha256_file
from camkd.errors import CamkdError
from camkd.models import create_model
from camkd.store import open_store

# ---- made differently ----------------------------------------------------------------------------

def test_other_dataset_is_named_first(tmp_path):
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8", num_classes=10, in_channels=1).state_dict()}, tmp_path / "t.pth")
    base = dict(teachers=[f"resnet8={tmp_path / 't.pth'}"], limit=64, views=1, features=["none"], out=str(tmp_path / "s.zarr"),
                device="cpu", progress=False, evaluate=False)
    cache_teachers(CacheConfig(dataset="synthetic", options={"channels": 1, "image_size": 28}, **base))
    with pytest.raises(CamkdError, match=r"made differently: --dataset synthetic in the store, fashion-mnist now; the "
                                         r"training data differ \(fingerprint [0-9a-f]{12}\.\.\. in the store, "
                                         r"[0-9a-f]{12}\.\.\. now\); .*; use --overwrite"):
        cache_teachers(CacheConfig(dataset="fashion-mnist", **base))


def test_features_none_with_layers_is_refused(cli, teachers, tmp_path, one_error):
    r = cli("cache-teachers", "-t", teachers["resnet8"], "-d", "synthetic", "--limit", "64", "-V", "1", "-f", "none", "-f",
            "penultimate", "--device", "cpu", "-q", "--out", tmp_path / "s.zarr")
    one_error(r, r"-f none stores no features, but layers are given too \(none, penultimate\)")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("change, pattern", [
    (("--limit", "100"), r"made differently: the store caches 128 samples \(--limit 128\), this run has 100; use "
                         r"--overwrite"),
    (("--aug-seed", "7"), r"made differently: --aug-seed 0 in the store, 7 now; use"),
    (("--dtype", "float32"), r"made differently: --dtype float16 in the store, float32 now; use"),
    (("-f", "hint:2"), r"made differently: the store holds no hint2 features \(-f penultimate\), this run asks for them; "),
])
def test_refuses_other_options_naming_the_difference(cli, teachers, small, change, pattern, one_error):
    path, args = small
    before = snapshot(path)
    new = args + list(change) if change[0] == "-f" else replace_opt(args, *change)
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *new), pattern)
    assert snapshot(path) == before


def test_store_without_features_names_dtype_alone_and_the_asked_layer(cli, teachers, tmp_path, one_error):
    """-f none stores no features: their type is no difference; a layer asked for says the store was made with -f none."""
    args = ["-d", "synthetic", "--limit", "64", "-V", "1", "--device", "cpu", "-q", "--no-eval", "--out", tmp_path / "s.zarr"]
    assert cli("cache-teachers", "-t", teachers["resnet8"], "-f", "none", *args).exit_code == 0
    line = one_error(cli("cache-teachers", "-t", teachers["resnet8"], "-f", "none", "--dtype", "float32", *args),
                     r"made differently: --dtype float16 in the store, float32 now; use --overwrite")
    assert "--feature-dtype" not in line, line
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], "-f", "penultimate", *args),
              r"made differently: the store holds no penultimate features \(-f none\), this run asks for them; use")


def test_refuses_other_layers_dropped(cli, teachers, small, one_error):
    path, args = small
    before = snapshot(path)
    new = replace_opt(args, "-f", "none")
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *new),
              r"made differently: the store holds penultimate features \(-f penultimate\), this run does not ask for them; ")
    assert snapshot(path) == before


def test_refuses_other_teachers(cli, teachers, small, tmp_path, one_error):
    path, args = small
    before = snapshot(path)
    h8, h16 = sha256_file(teachers["resnet8"])[:12], sha256_file(teachers["wrn_16_1"])[:12]
    one_error(cli("cache-teachers", "-t", teachers["wrn_16_1"], *args),
              rf"made differently: teacher 1 is resnet8 \(sha256 {h8}\.\.\.\) in the store, wrn_16_1 \(sha256 {h16}\.\.\.\) now; ")
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], "-t", teachers["wrn_16_1"], *args),
              r"made differently: the store has 1 teacher \(resnet8\), this run 2 \(resnet8, wrn_16_1\); ")
    # same arch and file name, other weights: the message must name the checkpoint digest
    ckpt = torch.load(teachers["resnet8"], map_location="cpu", weights_only=True)
    ckpt["model"] = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in ckpt["model"].items()}
    other = tmp_path / "other" / teachers["resnet8"].name
    other.parent.mkdir()
    torch.save(ckpt, other)
    msg = one_error(cli("cache-teachers", "-t", other, *args), r"teacher 1 is resnet8 \(sha256 \w{12}\.\.\.\) in the store")
    assert sha256_file(other)[:12] in msg and sha256_file(teachers["resnet8"])[:12] in msg, msg
    assert sha256_file(other)[:13] not in msg, msg
    assert snapshot(path) == before


def test_overwrite_replaces(cli, teachers, small, tmp_path):
    path, args = small
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    args = replace_opt(replace_opt(args, "--out", str(copy)), "--aug-seed", "7")
    r = cli("cache-teachers", "-t", teachers["resnet8"], *args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert open_store(copy).attrs["augmentation"]["seed"] == 7 and open_store(copy).progress().all()


def test_refuses_path_that_is_no_store(cli, teachers, small, tmp_path, one_error):
    _, args = small
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *replace_opt(args, "--out", str(folder))),
                       r"folder exists and is not a camkd store; choose another --out$")
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *replace_opt(args, "--out", str(folder)), "--overwrite"),
                       r"folder exists and is not a Zarr store; refusing to delete it even with --overwrite")
    assert (folder / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "file.zarr"
    a_file.write_text("mine")
    for extra in ([], ["--overwrite"]):
        one_error(cli("cache-teachers", "-t", teachers["resnet8"], *replace_opt(args, "--out", str(a_file)), *extra),
                           r"file\.zarr exists and is not a (camkd|Zarr) store")
        assert a_file.read_text() == "mine"
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").create_array("x", shape=(3,), dtype="i4")
    before = snapshot(plain)
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *replace_opt(args, "--out", str(plain))),
                       r"plain\.zarr is a Zarr group but not a camkd store.*--overwrite")
    assert snapshot(plain) == before
    with pytest.raises(CamkdError, match="not a camkd store"):
        open_store(plain)
    with pytest.raises(CamkdError, match="not a camkd store"):
        open_store(folder)


# ---- errors before output, one store format ------------------------------------------------------

def test_refusals_come_before_the_plan(cli, teachers, small, tmp_path, one_error):
    """Without -q cache-teachers prints its plan; a target it refuses is refused first, alone."""
    path, args = small
    loud = [a for a in args if a != "-q"]
    a_file = tmp_path / "file.zarr"
    a_file.write_text("mine")
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *replace_opt(loud, "--out", str(a_file))),
              r"file\.zarr exists and is not a camkd store")
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *replace_opt(loud, "--dtype", "float32")),
              r"made differently: --dtype float16 in the store, float32 now")


def test_a_layer_the_teacher_lacks_is_named_as_given(cli, teachers, tmp_path, one_error):
    r = cli("cache-teachers", "-t", teachers["resnet8"], "-d", "synthetic", "--limit", "64", "-V", "1", "-f", "hint:99",
            "--device", "cpu", "--out", tmp_path / "s.zarr")
    one_error(r, r"^error: --features hint:99: resnet8 has only \d+ feature outputs")


def test_feature_dtype_without_features_is_refused(cli, teachers, tmp_path, one_error):
    r = cli("cache-teachers", "-t", teachers["resnet8"], "-d", "synthetic", "--limit", "64", "-V", "1", "-f", "none",
            "--feature-dtype", "int8", "--device", "cpu", "--out", tmp_path / "s.zarr")
    one_error(r, r"--feature-dtype int8 .* but -f none stores no features")
    assert not (tmp_path / "s.zarr").exists()


def _drop_attr(path: Path, key: str) -> None:
    g = zarr.open_group(str(path), mode="r+")
    attrs = dict(g.attrs["camkd"])
    del attrs[key]
    g.attrs["camkd"] = attrs


def test_stores_of_earlier_layouts_are_refused_with_the_rebuild_command(cli, teachers, small, tmp_path, one_error):
    path, args = small
    old = clone(path, tmp_path / "old.zarr")
    _drop_attr(old, "compressor")  # what a pre-release camkd wrote
    rebuild = rf"written by an earlier camkd \(a pre-release layout \(no compressor recorded\)\); .*rebuild it with " \
              rf"'camkd cache-teachers \.\.\. --out {re.escape(str(old))} --overwrite'"
    with pytest.raises(CamkdError, match=rebuild):
        open_store(old)
    one_error(cli("cache-info", old), rebuild)
    one_error(cli("cache-teachers", "-t", teachers["resnet8"], *replace_opt(args, "--out", str(old))), rebuild)
    r = cli("cache-teachers", "-t", teachers["resnet8"], *replace_opt(args, "--out", str(old)), "--overwrite")
    assert r.exit_code == 0, r.output
    assert_stores_equal(old, path)
    other = clone(path, tmp_path / "other.zarr")
    g = zarr.open_group(str(other), mode="r+")
    g.attrs["camkd"] = dict(g.attrs["camkd"], format_version=0)
    one_error(cli("cache-info", other), r"earlier camkd \(store format 0\); this camkd reads format 1 only: rebuild")
