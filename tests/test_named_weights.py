"""Teachers as torchvision's published weights by name: ``-t tv:NAME@WEIGHTS`` (issue 25, first slice), offline.

Every test sets a temporary ``TORCH_HOME`` and replaces ``torch.hub.download_url_to_file`` (torch's, not camkd's) by
one that fails as an offline machine does, so nothing is ever downloaded. A random-init resnet18 state_dict saved
under the file name torchvision expects is refused: its sha256 is not the published file's, whose prefix the name
carries. The success path needs a file whose sha256 starts with the prefix in its name; the published file cannot be
had offline, so that test points torchvision's own ``ResNet18_Weights.IMAGENET1K_V1`` record at a file name carrying
the random file's sha256 prefix (torchvision's record is changed, camkd's code is not). What is not tested offline:
the download itself, and that the real published files pass the sha256 check and load strictly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from weights_helpers import fake_published, offline_torch_hub

from camkd.checkpoint import sha256_file
from camkd.errors import CamkdError
from camkd.store.description import TeacherRecord
from camkd.store.info import teacher_line
from camkd.teachers import load_teacher, runner
from camkd.weights import named_weights_spec, published_sha256_prefix, resolve_tv_weights

R18 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
R18_FILE = "resnet18-f37072fd.pth"  # the name torchvision's URL ends with


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch) -> list[str]:
    """Every test: a temporary TORCH_HOME; a download attempt fails as with no network and records its URL."""
    return offline_torch_hub(tmp_path, monkeypatch)


def _checkpoints(tmp_path: Path) -> Path:
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _random_resnet18(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, path)
    return state


def test_spec_syntax() -> None:
    assert named_weights_spec("tv:resnet50@IMAGENET1K_V2") == ("tv:resnet50", "IMAGENET1K_V2")
    assert named_weights_spec("tv:resnet18@DEFAULT") == ("tv:resnet18", "DEFAULT")
    assert named_weights_spec("tv:resnet18=runs/a@b.pth") is None  # ARCH=PATH stays a file
    assert named_weights_spec("runs/teacher/last.pth") is None


def test_default_resolves_to_the_enum_member() -> None:
    assert resolve_tv_weights("resnet18", "DEFAULT") is R18
    assert resolve_tv_weights("resnet50", "DEFAULT").name == "IMAGENET1K_V2"
    assert resolve_tv_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V1").name == "IMAGENET1K_V1"


def test_sha256_prefix_of_file_names() -> None:
    assert published_sha256_prefix("resnet50-11ad3fa6.pth") == "11ad3fa6"
    assert published_sha256_prefix("shufflenetv2_x0.5-f707e7126e.pth") == "f707e7126e"
    assert published_sha256_prefix("efficientnet_b0_rwightman-7f5810bc.pth") == "7f5810bc"
    assert published_sha256_prefix("teacher.pth") is None
    assert published_sha256_prefix("model-abc.pth") is None  # fewer than 8 hex digits: no prefix


def test_unknown_weights_name_lists_the_valid_ones(offline) -> None:
    with pytest.raises(CamkdError) as e:
        load_teacher("tv:resnet50@IMAGENET1K_V9")
    msg = str(e.value)
    assert "\n" not in msg and "IMAGENET1K_V9" in msg
    assert "IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT" in msg
    with pytest.raises(CamkdError, match="unknown torchvision model 'resnet999'"):
        load_teacher("tv:resnet999@DEFAULT")
    assert offline == []


def test_missing_file_names_file_folder_and_url(tmp_path, offline) -> None:
    with pytest.raises(CamkdError) as e:
        load_teacher("tv:resnet18@DEFAULT")
    msg = str(e.value)
    assert "\n" not in msg
    assert R18_FILE in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg and R18.url in msg
    assert offline == [R18.url]  # torch.hub tried once, where the file would go


def test_missing_file_is_one_cli_error_line(tmp_path, offline, cli, one_error) -> None:
    r = cli("cache-teachers", "-t", "tv:resnet18@IMAGENET1K_V1", "-d", "synthetic", "--limit", "8", "-V", "1",
            "--out", tmp_path / "store")
    one_error(r, rf"{R18_FILE}.*{tmp_path / 'torch' / 'hub' / 'checkpoints'}")


def test_unknown_weights_is_one_cli_error_line(tmp_path, offline, cli, one_error) -> None:
    r = cli("cache-teachers", "-t", "tv:resnet18@IMAGENET1K_V2", "-d", "synthetic", "--limit", "8", "-V", "1",
            "--out", tmp_path / "store")
    one_error(r, r"no weights 'IMAGENET1K_V2'.*IMAGENET1K_V1, DEFAULT")


def test_a_file_that_is_not_the_published_one_is_refused(tmp_path, offline) -> None:
    path = _checkpoints(tmp_path) / R18_FILE
    _random_resnet18(path)
    assert not sha256_file(path).startswith("f37072fd")
    with pytest.raises(CamkdError) as e:
        load_teacher("tv:resnet18@IMAGENET1K_V1")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{path} is not the published ResNet18_Weights.IMAGENET1K_V1" in msg and "f37072fd" in msg
    assert offline == []  # a file in the cache is used, never fetched again


def test_published_weights_load_with_their_provenance(tmp_path, offline, monkeypatch) -> None:
    """The whole path on a file whose sha256 matches its name (torchvision's record pointed at that name)."""
    state, path = fake_published(tmp_path, monkeypatch, R18, "resnet18")
    sha = sha256_file(path)

    t = load_teacher("tv:resnet18@DEFAULT")
    assert offline == []
    assert (t.arch, t.num_classes, t.in_channels, t.path, t.sha256) == ("tv:resnet18", 1000, 3, path, sha)
    assert t.weights == "ResNet18_Weights.IMAGENET1K_V1" and t.published_accuracy == pytest.approx(69.758)
    assert all(torch.equal(t.model.state_dict()[k], v) for k, v in state.items())
    ref = torchvision.models.resnet18(weights=None).eval()
    ref.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(t.model(x), ref(x))

    provenance = runner([t], torch.device("cpu")).provenance[0]
    assert provenance["weights"] == "ResNet18_Weights.IMAGENET1K_V1" and provenance["published_accuracy"] == pytest.approx(69.758)
    record = TeacherRecord.from_attrs({**provenance, "test_accuracy": 0.1})
    assert record.extra == {} and TeacherRecord.from_attrs(record.to_attrs()) == record
    line = teacher_line(0, record)
    assert "(ResNet18_Weights.IMAGENET1K_V1)" in line and "test top-1 0.10%, published top-1 69.76%" in line


def test_records_without_named_weights_are_as_before() -> None:
    old = {"arch": "resnet8", "checkpoint": "a.pth", "path": "runs/a.pth", "sha256": "0" * 64, "num_classes": 10,
           "test_accuracy": 71.5}
    record = TeacherRecord.from_attrs(old)
    assert record.weights is None and record.published_accuracy is None and record.to_attrs() == old
    assert teacher_line(0, record) == f"teacher t0 resnet8 runs/a.pth sha256 {'0' * 12} test top-1 71.50%"


def test_resnet50_v2_names_its_published_file(tmp_path, offline) -> None:
    with pytest.raises(CamkdError, match=r"ResNet50_Weights\.IMAGENET1K_V2 .*put resnet50-11ad3fa6\.pth in "):
        load_teacher("tv:resnet50@IMAGENET1K_V2")
    assert offline == [torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url]


def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, offline, monkeypatch) -> None:
    folder = _checkpoints(tmp_path)
    (folder / "tmp.pth").write_bytes(b"not a checkpoint")
    name = f"resnet18-{sha256_file(folder / 'tmp.pth')[:8]}.pth"
    (folder / "tmp.pth").rename(folder / name)
    monkeypatch.setattr(R18.value, "url", f"https://download.pytorch.org/models/{name}")
    with pytest.raises(CamkdError) as e:
        load_teacher("tv:resnet18@IMAGENET1K_V1")
    assert "\n" not in str(e.value) and f"{folder / name} is not a readable weights file" in str(e.value)
    assert offline == []


@pytest.mark.parametrize("name", __import__("camkd.models.tv", fromlist=["NAMES"]).NAMES)
def test_every_listed_model_loads_its_default_weights(name, tmp_path, offline, monkeypatch) -> None:
    """Every tv: model camkd lists: its DEFAULT weights resolve, a file of their shape (random, under a name carrying
    its sha256 prefix, torchvision's record pointed at it) loads strictly with the weights' provenance and eval
    transform, and its logits are torchvision's own model's."""
    from camkd.weights import load_published

    weights = resolve_tv_weights(name, "DEFAULT")
    state, path = fake_published(tmp_path, monkeypatch, weights, name, prefix=10)
    ref = torchvision.models.get_model(name, weights=None).eval()
    ref.load_state_dict(state)
    p = load_published(f"tv:{name}@DEFAULT")
    assert offline == [] and p.num_classes == 1000 and p.imagenet1k and p.path == path
    assert p.published_accuracy == pytest.approx(weights.meta["_metrics"]["ImageNet-1K"]["acc@1"])
    t = weights.transforms()
    assert (p.eval.crop, p.eval.resize, p.eval.interpolation) == (t.crop_size[0], t.resize_size[0], t.interpolation.value)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(p.model.eval()(x), ref(x))
