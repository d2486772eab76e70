"""The teachers of a store: bad checkpoints, duplicates, mismatch messages, provenance, their test evaluation."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from store_helpers import replace_opt, snapshot

from camkd.cache import CacheConfig, cache_teachers
from camkd.checkpoint import sha256_file
from camkd.errors import CamkdError
from camkd.models import create_model
from camkd.store import open_store

# ---- bad checkpoints, duplicates, provenance, mismatch messages ----------------------------------

def test_refuses_bad_teacher_checkpoints(cli, teachers, small, tmp_path, one_error):
    path, args = small
    before = snapshot(path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage, not a checkpoint")
    one_error(cli("cache-teachers", "-t", bad, *args), r"bad\.pth is not a readable (torch )?checkpoint")
    one_error(cli("cache-teachers", "-t", tmp_path / "missing.pth", *args), r"missing\.pth not found")
    # a reference checkpoint {'model': state_dict} of a 5-class resnet8
    five = tmp_path / "five.pth"
    torch.save({"model": create_model("resnet8", num_classes=5, in_channels=3).state_dict()}, five)
    one_error(cli("cache-teachers", "-t", f"resnet8={five}", *args), r"five\.pth has 5 classes but synthetic has 10")
    one_error(cli("cache-teachers", "-t", f"wrn_16_1={teachers['resnet8']}", *args), r"does not fit arch 'wrn_16_1'")
    one_error(cli("cache-teachers", "-t", five, *args), r"names no arch.*ARCH=PATH")
    assert snapshot(path) == before


def test_same_teacher_twice_is_refused(cli, teachers, small, tmp_path, one_error):
    from camkd.teachers import load_teachers

    path, args = small
    a = str(teachers["resnet8"])
    copy = tmp_path / "copy.pth"
    shutil.copy(a, copy)
    with pytest.raises(CamkdError, match=r"^teachers 1 and 3 are the same checkpoint \(sha256 [0-9a-f]{12}\): "
                                         rf"{re.escape(a)}, resnet8={re.escape(str(copy))}; give each teacher once$"):
        load_teachers([a, str(teachers["wrn_16_1"]), f"resnet8={copy}"])
    one_error(cli("cache-teachers", "-t", a, "-t", a, *replace_opt(args, "--out", str(tmp_path / "d.zarr"))),
                       r"teachers 1 and 2 are the same checkpoint")
    assert not (tmp_path / "d.zarr").exists()


def test_state_dict_mismatch_says_what_differs(tmp_path):
    from camkd.teachers import load_teacher

    state = create_model("resnet8", num_classes=10, in_channels=1).state_dict()
    state["extra.weight"] = torch.zeros(3)
    ckpt = tmp_path / "gray.pth"
    torch.save({"model": state, "meta": {"arch": "resnet8", "num_classes": 10, "in_channels": 3}}, ckpt)
    with pytest.raises(CamkdError) as e:
        load_teacher(str(ckpt))
    msg = str(e.value)
    assert "1 unexpected keys (e.g. extra.weight)" in msg, msg
    assert "1 keys with other shapes (e.g. conv1.weight: checkpoint [16, 1, 3, 3], model [16, 3, 3, 3])" in msg, msg
    assert "keys match" not in msg and "missing" not in msg, msg


def test_provenance_records_path_and_digest_but_identity_does_not(cli, teachers, tmp_path):
    base = dict(dataset="synthetic", limit=64, views=1, features=["none"], device="cpu", progress=False)
    path = tmp_path / "p.zarr"
    cache_teachers(CacheConfig(teachers=[str(teachers["resnet8"])], out=str(path), **base))
    meta = open_store(path).attrs["teachers"][0]
    assert meta["path"] == str(teachers["resnet8"]) and meta["checkpoint"] == "best.pth"
    info = cli("cache-info", path).output
    assert f"teacher t0 resnet8 {teachers['resnet8']} sha256 {sha256_file(teachers['resnet8'])[:12]} test top-1" in info, info
    # the same weights under another name and folder continue the same store
    moved = tmp_path / "elsewhere" / "renamed.pth"
    moved.parent.mkdir()
    shutil.copy(teachers["resnet8"], moved)
    s = cache_teachers(CacheConfig(teachers=[str(moved)], out=str(path), **dict(base, views=2)))
    assert s["rows_computed"] == 64
    assert open_store(path).attrs["teachers"][0]["path"] == str(teachers["resnet8"])  # provenance of the creation


# ---- defaults and evaluation ---------------------------------------------------------------------

def test_defaults_store_penultimate_and_evaluate_with_a_small_batch(teachers, tmp_path, monkeypatch):
    from camkd import cache
    from camkd.store.config import batch_size_for

    calls = []
    real = cache.evaluate
    monkeypatch.setattr(cache, "evaluate", lambda model, data, **kw: calls.append(kw) or real(model, data, **kw))
    cfg = CacheConfig(teachers=[str(teachers["resnet8"])], dataset="synthetic", limit=64, device="cpu", progress=False,
                      out=str(tmp_path / "d.zarr"))
    assert cfg.features == ["penultimate"] and cfg.batch_size is None and cfg.evaluate
    assert batch_size_for(cfg, torch.device("cpu")) == 64 and batch_size_for(cfg, torch.device("cuda")) == 256
    s = cache_teachers(cfg)
    assert [c["batch_size"] for c in calls] == [64]
    assert s["layers"] == ["penultimate"] and list(open_store(tmp_path / "d.zarr").layers) == ["penultimate"]


def test_no_eval_records_no_accuracy(cli, teachers, tmp_path, monkeypatch):
    from camkd import cache

    def never(*a, **k):
        raise AssertionError("evaluated although evaluate=False")

    monkeypatch.setattr(cache, "evaluate", never)
    real = cache._load
    monkeypatch.setattr(cache, "_load", lambda cfg, split, device: never() if split == "test" else real(cfg, split, device))
    path = tmp_path / "n.zarr"
    cache_teachers(CacheConfig(teachers=[str(teachers["resnet8"])], dataset="synthetic", limit=64, device="cpu",
                               progress=False, evaluate=False, out=str(path)))
    a = open_store(path).attrs
    assert "test_accuracy" not in a["teachers"][0] and "teacher_test_accuracy" not in a
    info = cli("cache-info", path).output
    assert "test accuracy not evaluated" in info, info


def test_evaluation_names_the_whole_test_split_once(teachers, tmp_path, monkeypatch):
    """Under torchrun each rank evaluates its slice; the main rank names the whole split, the others nothing."""
    from camkd import cache, dist
    from camkd.teachers import load_teachers

    said = []
    monkeypatch.setattr(cache, "log", said.append)
    cfg = CacheConfig(teachers=[str(teachers["resnet8"])], dataset="synthetic", limit=64, device="cpu", progress=True)
    loaded = load_teachers(cfg.teachers)
    n = len(cache._load(cfg, "test", torch.device("cpu")))
    accs = [cache.teacher_test_accuracy(cfg, loaded, torch.device("cpu"), 64, dist.World(rank=rank, size=2))
            for rank in (0, 1)]
    assert all(len(acc) == 1 for acc in accs)
    assert said == [f"evaluating 1 teacher on the synthetic test split ({n} images; --no-eval skips this)",
                    f"teacher test top-1 (%): {accs[0][0]:.2f}"], said
