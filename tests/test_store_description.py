"""The typed store description: a store's attrs parsed once and written back byte for byte, and the fields added to
the format later read with their old meaning when a store from before them is opened."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import zarr

from camkd.cache import CacheConfig, cache_teachers
from camkd.models import create_model
from camkd.store import layout, open_store
from camkd.store.description import PRECISION_BEFORE, StoreDescription, TeacherRecord
from camkd.store.topk import LogitsSpec

BASE = dict(dataset="synthetic", limit=128, views=1, aug_seed=3, device="cpu", progress=False, batch_size=64)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """A dense store with accuracy recorded, and a top-k int8 zstd store with features (its tail mass recorded)."""
    root = tmp_path_factory.mktemp("described")
    torch.manual_seed(0)
    ckpt = root / "t.pth"
    torch.save({"model": create_model("resnet8", num_classes=10, in_channels=3).state_dict()}, ckpt)
    kinds = {"dense": dict(features=[], dtype="float32"),
             "topk": dict(features=["penultimate"], logits="topk:3", kd_T=[4.0], feature_dtype="int8", compressor="zstd",
                          evaluate=False)}
    out = {}
    for name, kw in kinds.items():
        out[name] = root / f"{name}.zarr"
        cache_teachers(CacheConfig(teachers=[f"resnet8={ckpt}"], out=str(out[name]), **BASE, **kw))
    return out


def _stored_attrs(path: Path) -> dict:
    return zarr.open_group(str(path), mode="r").attrs[layout.ATTRS_KEY]


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_a_written_store_parses_and_writes_back_the_same_attrs(stores, kind):
    attrs = _stored_attrs(stores[kind])
    d = open_store(stores[kind]).description
    assert json.dumps(d.to_attrs()) == json.dumps(attrs)  # the same keys, values and order: the same zarr.json
    assert json.dumps(StoreDescription.from_attrs(attrs).to_attrs()) == json.dumps(attrs)


def test_the_description_is_typed(stores):
    dense, k3 = open_store(stores["dense"]).description, open_store(stores["topk"]).description
    assert dense.dataset.n == 128 and dense.dataset.name == "synthetic" and dense.views == 1
    assert isinstance(dense.teachers[0], TeacherRecord) and dense.teachers[0].arch == "resnet8"
    assert dense.teachers[0].test_accuracy is not None and k3.teachers[0].test_accuracy is None  # --no-eval: absent
    assert "test_accuracy" not in k3.to_attrs()["teachers"][0]
    assert dense.logits == LogitsSpec() and k3.logits == LogitsSpec("topk", 3, (4.0,))
    assert k3.int8_features and k3.compression and k3.feature_scale and dense.compression is None
    assert list(k3.features) == ["penultimate"] and k3.features["penultimate"].index == -2
    assert k3.topk_tail_mass is not None and "4" in k3.topk_tail_mass and dense.topk_tail_mass is None
    assert not dense.keeps_pixels and dense.aug_spec().to_dict() == dense.augmentation
    assert dense.precision == "fp32" and dense.channels_last is False
    # made on the CPU: TF32 recorded, off for both ops (written to the attrs, parsed back)
    assert _stored_attrs(stores["dense"])["teacher_tf32"] == {"conv": False, "matmul": False}
    assert dense.teacher_tf32 == {"conv": False, "matmul": False} and dense.tf32 is False
    assert not dense.folder.whole and dense.folder.to_attrs() == {}


def test_fields_added_later_get_their_old_meaning():
    """A store written before teacher_precision, teacher_channels_last and folder_whole were recorded: fp32, the
    default layout, not known to hold a whole folder; written back without them."""
    attrs = {"format_version": 1, "dataset": {"name": "imagefolder", "split": "train", "n": 4, "fingerprint": "ab",
                                              "num_classes": 2, "in_channels": 3, "image_size": 32},
             "augmentation": {"seed": 0, "recipe": "rrc", "padding": 0, "normalization": {"mean": [0.5], "std": [0.5]}},
             "teachers": [{"arch": "resnet8", "checkpoint": "t.pth", "path": "/t.pth", "sha256": "ff", "num_classes": 2}],
             "dtype": "float16", "feature_dtype": "float16", "compressor": "none", "logits": {"kind": "dense"},
             "features": {}, "data_kind": "files", "decoder": "pillow", "decoder_versions": {"pillow": "1"},
             "classes": ["a", "b"], "views": 2, "block_rows": 64, "camkd_version": "0.1", "arrays": {},
             "some_later_key": [1, 2]}
    d = StoreDescription.from_attrs(attrs)
    assert d.precision == PRECISION_BEFORE == "fp32" and d.channels_last is False and d.folder.whole is False
    assert d.teacher_tf32 is None and d.tf32 is False and d.tf32_ops == {"conv": False, "matmul": False}  # TF32: off
    assert d.identity()["teacher_precision"] == "fp32"  # compared as fp32 when a run continues it
    assert d.folder.classes == ["a", "b"] and d.extra == {"some_later_key": [1, 2]}
    assert d.to_attrs() == attrs and list(d.to_attrs()) == list(attrs)
    more = replace(d, views=3).to_attrs()
    assert more["views"] == 3 and "teacher_precision" not in more and "folder_whole" not in more
    assert "teacher_tf32" not in more


def test_a_store_made_with_tf32_says_so_and_is_continued_by_a_run_without(stores):
    """teacher_tf32 as a GPU writes it (cuDNN's default: convolutions in TF32): parsed per op, written back where the
    format puts it (after the teachers' layout), and not part of the identity a continuing run must match."""
    attrs = _stored_attrs(stores["dense"])
    gpu = {**attrs, "teacher_tf32": {"conv": True, "matmul": False}}
    d = StoreDescription.from_attrs(gpu)
    assert d.tf32 is True and d.tf32_ops == {"conv": True, "matmul": False}
    assert json.dumps(d.to_attrs()) == json.dumps(gpu)
    keys = list(d.to_attrs())
    assert keys.index("teacher_tf32") == keys.index("teacher_channels_last") + 1
    assert d.identity() == StoreDescription.from_attrs(attrs).identity()


def test_no_module_reads_store_attrs_by_key_but_the_description():
    """Store metadata is read through StoreDescription only; the format check (layout.check_format) and the logits
    spec's parser (topk.LogitsSpec.from_attrs, called by the description) read the raw attrs before it exists."""
    root = Path(__file__).resolve().parents[1] / "camkd"
    allowed = {"store/description.py", "store/layout.py", "store/topk.py"}
    raw = re.compile(r"""attrs\[['"]|attrs\.get\(['"]""")
    found = [f"{p.relative_to(root)}:{i}" for p in sorted(root.rglob("*.py")) if str(p.relative_to(root)) not in allowed
             for i, line in enumerate(p.read_text().splitlines(), 1) if raw.search(line)]
    assert found == []
