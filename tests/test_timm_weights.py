"""Teachers as timm's published weights by name: ``-t timm:NAME.TAG`` (issue 25), offline.

Every test sets ``HF_HUB_OFFLINE=1`` and a temporary ``HF_HOME`` and ``TORCH_HOME``, and replaces timm's own download
functions by ones that fail, so nothing is ever downloaded. The published files cannot be had offline: the tests lay a
random-init timm state_dict (safetensors) out in the Hugging Face cache as huggingface_hub does (``refs/main`` -> a
commit, ``snapshots/<commit>/FILE`` -> a link to ``blobs/<sha256>``), checked with huggingface_hub's own
``try_to_load_from_cache``. Not tested offline: the download itself and the real published files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import safetensors.torch
import timm
import timm.models._builder
import torch
from huggingface_hub import try_to_load_from_cache
from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg

from camkd.errors import CamkdError
from camkd.teachers import load_teachers
from camkd.weights import _timm_eval, load_published, named_weights_spec

NAME, TAG = "resnet10t", "c3_in1k"
SPEC, REPO = f"timm:{NAME}.{TAG}", f"timm/{NAME}.{TAG}"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch) -> Path:
    """Offline, with a temporary Hugging Face cache (returned) and torch.hub folder; timm's downloads fail loudly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError(f"timm tried to download {args}")

    for fn in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file", "load_custom_from_hf"):
        monkeypatch.setattr(timm.models._builder, fn, no_download, raising=False)
    return tmp_path / "hf" / "hub"


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in timm.create_model(NAME, num_classes=1000).state_dict().items()}


def put_in_cache(cache: Path, data: bytes, file: str = "model.safetensors", blob: str | None = None) -> Path:
    """``data`` as ``file`` of REPO in the Hugging Face cache ``cache``, as huggingface_hub lays it out."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    blob_path = repo / "blobs" / (blob or hashlib.sha256(data).hexdigest())
    blob_path.parent.mkdir(parents=True, exist_ok=True)
    blob_path.write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT / file
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.symlink_to(os.path.relpath(blob_path, snapshot.parent))
    assert try_to_load_from_cache(REPO, file, cache_dir=cache) == str(snapshot)  # huggingface_hub's own lookup finds it
    return snapshot


def saved(cache: Path, tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")
    return put_in_cache(cache, (tmp_path / "w.safetensors").read_bytes())


def test_specs_parse():
    assert named_weights_spec("timm:convnext_tiny.fb_in22k_ft_in1k") == ("timm:convnext_tiny", "fb_in22k_ft_in1k")
    assert named_weights_spec("timm:resnet18.a1_in1k") == ("timm:resnet18", "a1_in1k")


def test_teacher_loads_the_cached_file_by_timm(offline, tmp_path):
    state = random_state()
    snapshot = saved(offline, tmp_path, state)
    (t,) = load_teachers([SPEC])  # what -t timm:NAME.TAG does
    assert (t.arch, t.weights, t.path, t.num_classes, t.imagenet1k) == (f"timm:{NAME}", REPO, snapshot, 1000, True)
    assert t.sha256 == hashlib.sha256(snapshot.read_bytes()).hexdigest() == snapshot.resolve().name
    got = t.model.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())
    ref = timm.create_model(NAME, num_classes=1000)
    ref.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(t.model(x), ref.eval()(x))


def test_pytorch_model_bin_when_no_safetensors(offline, tmp_path):
    state = random_state(1)
    torch.save(state, tmp_path / "w.bin")
    snapshot = put_in_cache(offline, (tmp_path / "w.bin").read_bytes(), file="pytorch_model.bin")
    p = load_published(SPEC)
    assert p.path == snapshot and p.name == REPO and p.published_accuracy is None
    assert torch.equal(p.model.state_dict()["fc.weight"], state["fc.weight"])


def test_missing_file_offline_is_one_line(offline):
    with pytest.raises(CamkdError) as e:
        load_published(SPEC)
    msg = str(e.value)
    assert "\n" not in msg and REPO in msg and "model.safetensors" in msg and "HF_HOME" in msg and str(offline) in msg


def test_tampered_blob_is_refused(offline, tmp_path):
    safetensors.torch.save_file(random_state(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    put_in_cache(offline, data, blob=hashlib.sha256(b"the published file").hexdigest())
    with pytest.raises(CamkdError, match="is not the published timm/resnet10t.c3_in1k") as e:
        load_published(SPEC)
    # the advice works: the repo's folder, not the snapshot's link (huggingface_hub would link the same blob again)
    assert "\n" not in str(e.value) and f"delete {offline / 'models--timm--resnet10t.c3_in1k'} " in str(e.value)


def test_no_network_is_one_line_at_once(offline, monkeypatch):
    """Not offline by setting, but the Hub cannot be reached (here: a closed port on 127.0.0.1): one line from the
    connection check, before huggingface_hub's five retries."""
    import socket

    import huggingface_hub.constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the socket is: nothing listens there
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    tried = []
    monkeypatch.setattr(huggingface_hub.file_download, "get_hf_file_metadata", lambda *a, **k: tried.append(a))
    with pytest.raises(CamkdError) as e:
        load_published(SPEC)
    msg = str(e.value)
    assert "\n" not in msg and f"127.0.0.1:{port} cannot be reached" in msg and REPO in msg and tried == []


def test_file_that_does_not_fit_is_one_line(offline, tmp_path):
    state = random_state()
    state["fc.weight"] = state["fc.weight"][:10]
    saved(offline, tmp_path, state)
    with pytest.raises(CamkdError, match=r"does not fit timm:resnet10t: .*fc\.weight") as e:
        load_published(SPEC)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec, shown", [("timm:resnet18.nope", "a1_in1k"), ("timm:resnet10t.in1k", "c3_in1k")])
def test_unknown_tag_lists_the_tags(spec, shown):
    with pytest.raises(CamkdError, match=f"no pretrained tag .*{shown}") as e:
        load_published(spec)
    assert "\n" not in str(e.value)


def test_unknown_model_and_url_only_tags_are_one_line():
    with pytest.raises(CamkdError, match="unknown arch 'timm:nosuchnet'"):
        load_published("timm:nosuchnet.in1k")
    with pytest.raises(CamkdError, match="URL only"):
        load_published("timm:legacy_seresnet18.in1k")


@pytest.mark.parametrize("name", ["resnet18.a1_in1k", "resnet10t.c3_in1k", "mobilenetv3_small_050.lamb_in1k",
                                  "convnext_tiny.fb_in22k_ft_in1k", "resnet50.tv_in1k"])
def test_eval_transform_is_timms(name):
    cfg = get_pretrained_cfg(name)
    ours = _timm_eval(name, cfg)
    config = resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    resize, crop = create_transform(**config).transforms[:2]
    assert (ours.resize, ours.interpolation) == (resize.size, resize.interpolation.value)
    assert [ours.crop, ours.crop] == list(crop.size)
    assert (ours.mean, ours.std) == (tuple(config["mean"]), tuple(config["std"]))


def test_imagenet1k_only_for_in1k_heads():
    from camkd import weights

    assert all(weights._IN1K_TAG.fullmatch(t) for t in ["in1k", "a1_in1k", "fb_in22k_ft_in1k_384", "sw_in12k_ft_in1k_288"])
    assert not any(weights._IN1K_TAG.fullmatch(t) for t in ["in21k", "fb_in22k", "in1k_ft_in22k", "fb_dino", "in12k"])
