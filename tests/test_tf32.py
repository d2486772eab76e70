"""TF32 and the store: what a store records of it, and the float32 tolerance cache-verify derives from the record and
from the verifying machine's own setting.

On the CPU nothing runs in TF32, so the GPU's side is tested through torch's own settings (readable without a GPU)
and through the tolerance function; a CPU store is made, recorded as off, and verified as before."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import zarr

from camkd.cache import CacheConfig, cache_teachers, cache_verify
from camkd.models import create_model
from camkd.store import layout, open_store
from camkd.store.config import CacheConfig as StoreConfig
from camkd.store.description import StoreDescription, read_description, tf32_of
from camkd.store.identity import _continue
from camkd.store.info import cache_info, tf32_line
from camkd.store.location import parse_location
from camkd.store.verify import SLACK, TF32_RTOL, _tolerance, _tolerance_text

OFF = {"conv": False, "matmul": False}


@pytest.fixture
def tf32_settings():
    """torch's TF32 settings (every level of the fp32_precision API) restored after a test that changes them."""
    b, cudnn = torch.backends, torch.backends.cudnn
    levels = [(b, "fp32_precision"), (cudnn, "fp32_precision"), (cudnn.conv, "fp32_precision"),
              (cudnn.rnn, "fp32_precision"), (b.cuda.matmul, "fp32_precision")]
    old = [getattr(o, name) for o, name in levels]
    yield
    for (o, name), value in zip(levels, old):
        setattr(o, name, value)


def test_tf32_of_follows_torchs_settings_on_cuda_and_is_off_elsewhere(tf32_settings):
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    cudnn.allow_tf32, matmul.allow_tf32 = True, False  # PyTorch's defaults
    assert tf32_of("cuda") == {"conv": True, "matmul": False}
    assert tf32_of(torch.device("cpu")) == OFF  # no TF32 on a CPU, whatever CUDA's settings say
    matmul.allow_tf32 = True
    assert tf32_of(torch.device("cuda", 1)) == {"conv": True, "matmul": True} and tf32_of("cpu") == OFF
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    assert tf32_of("cuda") == OFF
    torch.set_float32_matmul_precision("high")  # the other way to ask for TF32 matmuls
    assert tf32_of("cuda")["matmul"] is True
    torch.set_float32_matmul_precision("highest")
    # the fp32_precision API, mixed with the legacy one so that torch's allow_tf32 refuses to answer
    cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = "tf32", "ieee"
    with pytest.raises(RuntimeError):
        cudnn.allow_tf32  # noqa: B018 - the refusal _tf32 falls back from
    assert tf32_of("cuda")["conv"] is True
    cudnn.conv.fp32_precision = "ieee"
    assert tf32_of("cuda")["conv"] is False


def test_the_tolerance_widens_when_either_side_ran_tf32():
    """The float32 bound as before when neither the store's teachers nor this machine used TF32; with either (or
    both) the same wider bound, wide enough for TF32's rounding of a value and of a near-zero value among larger ones
    (a sum of larger terms), and still far below a real difference."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 16, 3, 3)).astype(np.float32)
    ref[0, 0, 0, 0] = 1e-6  # a value near zero in a sample of values around 1
    base = _tolerance("float32", ref)
    assert np.array_equal(base, np.finfo(np.float32).eps * np.abs(ref) + SLACK * (1 + np.abs(ref)))  # unchanged
    made, here, both = (_tolerance("float32", ref, made_tf32=m, here_tf32=h) for m, h in ((1, 0), (0, 1), (1, 1)))
    assert np.array_equal(made, here) and np.array_equal(made, both)
    assert (made > base).all()
    tf32_error = np.abs(ref) * 2.0**-10 + np.abs(ref).mean(axis=(1, 2, 3), keepdims=True) * 2.0**-10
    assert (tf32_error > base).any() and (tf32_error <= made).all()
    assert made[0, 0, 0, 0] >= TF32_RTOL * np.abs(ref[0]).mean()  # the near-zero value: its sample's scale
    assert not (0.05 * (1 + np.abs(ref)) <= made).any()  # a 5% difference is still a mismatch
    # every stored dtype gets TF32's share on top of its own rounding
    scale = np.full((4, 16), 0.01, dtype=np.float32)
    for dtype, s in (("float16", None), ("int8", scale)):
        assert (_tolerance(dtype, ref, s, here_tf32=True) > _tolerance(dtype, ref, s)).all(), dtype
    assert _tolerance_text("float32") == "1.19e-07|x| + 0.0001(1 + |x|) (float32)"
    assert "(TF32)" in _tolerance_text("float32", True)


@pytest.fixture(scope="module")
def cpu_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf32")
    torch.manual_seed(0)
    ckpt = root / "t.pth"
    torch.save({"model": create_model("resnet8", num_classes=10, in_channels=3).state_dict()}, ckpt)
    path = root / "s.zarr"
    cache_teachers(CacheConfig(teachers=[f"resnet8={ckpt}"], dataset="synthetic", limit=64, views=1, aug_seed=3,
                               features=["penultimate"], dtype="float32", device="cpu", out=str(path), progress=False,
                               evaluate=False, batch_size=32))
    return path, f"resnet8={ckpt}"


def test_a_cpu_store_records_tf32_off_shows_it_and_verifies(cpu_store):
    path, teacher = cpu_store
    assert zarr.open_group(str(path), mode="r").attrs[layout.ATTRS_KEY]["teacher_tf32"] == OFF
    assert "tf32       off: the teachers' convolutions and matmuls ran in float32 throughout" in cache_info(path).splitlines()
    rep = cache_verify(path, [teacher], sample=32, device="cpu")
    assert rep.ok, rep.lines
    assert not any(line.startswith("TF32:") for line in rep.lines)  # neither side: the float32 bound as before
    assert any(line.endswith("tolerance per value x: 1.19e-07|x| + 0.0001(1 + |x|) (float32)") for line in rep.lines)


def test_cache_info_says_what_was_recorded(cpu_store):
    d = open_store(cpu_store[0]).description
    old = StoreDescription.from_attrs({k: v for k, v in d.to_attrs().items() if k != "teacher_tf32"})
    assert tf32_line(old).startswith("tf32       not recorded (a store from before it was): taken as off")
    conv = replace(d, teacher_tf32={"conv": True, "matmul": False})
    assert tf32_line(conv).startswith("tf32       on for convolutions, off for matmuls: float32 outputs to ~10 mantissa bits")
    both = replace(d, teacher_tf32={"conv": True, "matmul": True})
    assert tf32_line(both).startswith("tf32       on for convolutions and matmuls:")


def test_continuing_a_store_with_tf32_records_it(cpu_store, tmp_path):
    """A store made without TF32 and continued by a run with it (a GPU's default) holds blocks in TF32: the continuing
    run records it (so a CPU's cache-verify widens its bound); a run without TF32 leaves the record as it is."""
    import shutil

    path = tmp_path / "s.zarr"
    shutil.copytree(cpu_store[0], path)
    loc = parse_location(str(path))
    cfg = StoreConfig(teachers=[cpu_store[1]], dataset="synthetic", views=1, out=str(path))
    stored = open_store(path).description
    before = (path / "zarr.json").read_bytes()
    _continue(loc, cfg, stored)  # the same run again (a CPU): nothing to record
    assert (path / "zarr.json").read_bytes() == before
    _continue(loc, cfg, replace(stored, teacher_tf32={"conv": True, "matmul": False}))
    now = read_description(zarr.open_group(str(path), mode="r"))
    assert now.teacher_tf32 == {"conv": True, "matmul": False} and replace(now, teacher_tf32=OFF) == stored
    _continue(loc, cfg, stored)  # a later run without TF32 does not take it back: those blocks are still TF32's
    assert read_description(zarr.open_group(str(path), mode="r")).tf32_ops["conv"] is True
