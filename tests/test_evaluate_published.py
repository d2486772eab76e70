"""`camkd evaluate tv:NAME@WEIGHTS --dataset imagefolder`: published weights evaluated as published (issue 25), offline.

As in test_named_weights.py, every test sets a temporary ``TORCH_HOME`` and makes torch.hub's download fail; the
"published" file is a random-init resnet18 state_dict whose name carries its own sha256 prefix, torchvision's
``ResNet18_Weights.IMAGENET1K_V1`` record pointed at it. The reference computation is independent of camkd's data
path: torchvision's own ``weights.transforms()`` on each PIL image, torchvision's resnet18 with the same state_dict,
the logits' columns of the folder's wnids picked by hand from timm's ImageNet-1k class list.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification
from weights_helpers import fake_published, offline_torch_hub

R18 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
SPEC = "tv:resnet18@IMAGENET1K_V1"
WNIDS = ("n01440764", "n01443537", "n01484850")  # tench, goldfish, great white shark


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch) -> list[str]:
    """Every test: a temporary TORCH_HOME; a download attempt fails as with no network and records its URL."""
    return offline_torch_hub(tmp_path, monkeypatch)


@pytest.fixture
def published(tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    """A random-init resnet18 state_dict accepted as R18 IMAGENET1K_V1 (its file name carries its sha256 prefix)."""
    return fake_published(tmp_path, monkeypatch, R18, "resnet18")[0]


def _write_images(root: Path, classes, per_class: int, seed: int = 0, sizes=(40, 91)) -> Path:
    """ROOT/val/CLASS/*: non-square images (JPEG, every third a PNG, one grayscale JPEG per class)."""
    rng = np.random.default_rng(seed)
    for c, cls in enumerate(classes):
        (root / "val" / cls).mkdir(parents=True)
        (root / "train" / cls).mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(*sizes, size=2))
            a = np.clip(rng.normal(60 + 60 * (c % 3), 50, size=(h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(a).convert("L") if i == 1 else Image.fromarray(a)
            img.save(root / "val" / cls / f"{cls}_{i}.{'png' if i % 3 == 2 else 'JPEG'}", quality=90)
            img.save(root / "train" / cls / f"{cls}_{i}.JPEG", quality=90)
    return root


@pytest.fixture
def wnid_folder(tmp_path) -> Path:
    return _write_images(tmp_path / "subset", WNIDS, per_class=3)


def _evaluate(cli, root: Path, *extra: str) -> tuple[dict, str]:
    args = ("evaluate", SPEC, "--dataset", "imagefolder", "--data-dir", root, "--workers", "0", "--device", "cpu",
            "--batch-size", "4", *extra)
    r = cli(*args, "--json")
    assert r.exit_code == 0, r.output
    line = cli(*args)
    assert line.exit_code == 0, line.output
    return json.loads(r.output), line.output.strip()


@torch.inference_mode()
def _reference(state: dict, root: Path, transform) -> dict[str, float]:
    """torchvision's transform on each PIL image, torchvision's resnet18, the wnids' columns picked by hand."""
    from timm.data import ImageNetInfo

    model = torchvision.models.resnet18(weights=None).eval()
    model.load_state_dict(state)
    names = list(ImageNetInfo().label_names())
    classes = sorted(p.name for p in (root / "val").iterdir())
    rows = [names.index(c) for c in classes]
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / "val" / cls).iterdir()):
            with Image.open(f) as img:
                xs.append(transform(img.convert("RGB")))
            ys.append(label)
    logits = model(torch.stack(xs))[:, rows]
    y = torch.tensor(ys)
    return {"top1": 100.0 * (logits.argmax(1) == y).double().mean().item(),
            "loss": torch.nn.functional.cross_entropy(logits.double(), y).item(), "n": len(ys)}


def _agree(r: dict, ref: dict) -> None:
    assert r["samples"] == ref["n"]
    assert r["top1"] == pytest.approx(ref["top1"], abs=1e-9)  # the same images predicted the same (exactly)
    assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_evaluated_with_the_weights_transform_and_restricted_to_the_wnids(cli, published, wnid_folder, offline):
    r, line = _evaluate(cli, wnid_folder)
    _agree(r, _reference(published, wnid_folder, R18.transforms()))
    assert offline == []
    assert r["weights"] == "ResNet18_Weights.IMAGENET1K_V1" and r["arch"] == "tv:resnet18"
    assert "the weights' eval transform (resize 256 bilinear, centre crop 224) and normalization" in line
    assert "restricted to the dataset's 3 ImageNet-1k classes" in line
    assert line.startswith(f"{SPEC} (ResNet18_Weights.IMAGENET1K_V1) on imagefolder test (9 images")
    assert "published" not in line and r["published_top1"] is None  # ImageNet-1k's number says nothing of 3 classes


def test_another_published_transform_is_followed(cli, published, wnid_folder, monkeypatch):
    """Weights published with another transform (bicubic, resize 176, crop 160: torchvision's record changed) are
    evaluated with it: not with camkd's default resize to round(crop / 0.875) bilinear."""
    monkeypatch.setattr(R18.value, "transforms", functools.partial(ImageClassification, crop_size=160, resize_size=176,
                                                                   interpolation=InterpolationMode.BICUBIC))
    r, line = _evaluate(cli, wnid_folder)
    _agree(r, _reference(published, wnid_folder, R18.transforms()))
    assert "the weights' eval transform (resize 176 bicubic, centre crop 160)" in line


def test_overrides_change_the_geometry(cli, published, wnid_folder):
    default, _ = _evaluate(cli, wnid_folder)
    r, line = _evaluate(cli, wnid_folder, "--resize", "300")
    transform = ImageClassification(crop_size=224, resize_size=300)
    _agree(r, _reference(published, wnid_folder, transform))
    assert r["loss"] != pytest.approx(default["loss"], rel=1e-5)  # --resize was not ignored
    assert "resize 300 bilinear, centre crop 224 (the weights': resize 256 bilinear, centre crop 224)" in line

    r, line = _evaluate(cli, wnid_folder, "--image-size", "112", "--interpolation", "bicubic")
    transform = ImageClassification(crop_size=112, resize_size=128, interpolation=InterpolationMode.BICUBIC)
    _agree(r, _reference(published, wnid_folder, transform))  # a crop alone keeps the weights' ratio: 112 / 0.875
    assert "resize 128 bicubic, centre crop 112" in line


def test_the_whole_imagenet_val_shows_the_published_accuracy(cli, published, tmp_path):
    """1000 wnid folders (ImageNet-1k's classes, 1 tiny image each): no restriction, the published top-1 beside."""
    from timm.data import ImageNetInfo

    root = _write_images(tmp_path / "in1k", ImageNetInfo().label_names(), per_class=1, sizes=(8, 12))
    r, line = _evaluate(cli, root, "--limit", "4", "--image-size", "16")
    assert r["samples"] == 4 and "restricted" not in line
    assert r["published_top1"] == pytest.approx(69.758) and line.endswith("published top-1 69.76%")


def test_folders_that_are_not_imagenet_classes_are_refused(cli, one_error, published, tmp_path):
    from folder_helpers import make_folder

    root = make_folder(tmp_path / "abc", train=1, val=1)
    one_error(cli("evaluate", SPEC, "--dataset", "imagefolder", "--data-dir", root, "--workers", "0", "--device", "cpu"),
              r"predicts 1000 classes but imagefolder here has 3")


def test_refusals_are_one_line(cli, one_error, published, wnid_folder, tmp_path, offline):
    base = ("--data-dir", wnid_folder, "--workers", "0", "--device", "cpu")
    one_error(cli("evaluate", SPEC, "--dataset", "cifar100", "--data-dir", tmp_path), r"image folder.*cifar100 is held "
              r"in memory.*--dataset imagefolder or tinyimagenet")
    one_error(cli("evaluate", SPEC, *base), r"names published weights, not data: add --dataset \(imagefolder, tinyimagenet\)")
    one_error(cli("evaluate", "tv:resnet18@IMAGENET1K_V2", "--dataset", "imagefolder", *base),
              r"no weights 'IMAGENET1K_V2'.*IMAGENET1K_V1, DEFAULT")
    one_error(cli("evaluate", SPEC, "--dataset", "imagefolder", *base, "--resize", "100"),
              r"--resize 100 is smaller than the centre crop 224")
    assert offline == []


def test_geometry_options_are_refused_for_data_in_memory(cli, one_error, tmp_path):
    from camkd.models import create_model

    torch.save({"model": create_model("resnet8", num_classes=10, in_channels=3).state_dict()}, tmp_path / "t.pth")
    one_error(cli("evaluate", f"resnet8={tmp_path / 't.pth'}", "--dataset", "synthetic", "--device", "cpu", "--resize", "40"),
              r"--resize applies to image folders.*synthetic is held in memory")


def test_geometry_options_apply_to_any_model_on_an_image_folder(cli, tmp_path):
    """An ARCH=PATH reference file on an image folder: --image-size / --resize set its evaluation geometry too."""
    from folder_helpers import make_folder

    from camkd.models import create_model

    root = make_folder(tmp_path / "abc", train=1, val=2)
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8", num_classes=3, in_channels=3).state_dict()}, tmp_path / "t.pth")
    args = ("evaluate", f"resnet8={tmp_path / 't.pth'}", "--dataset", "imagefolder", "--data-dir", root, "--workers", "0",
            "--device", "cpu")
    plain, given = cli(*args, "--image-size", "16"), cli(*args, "--image-size", "16", "--resize", "40")
    assert plain.exit_code == 0 and given.exit_code == 0, plain.output + given.output
    assert "resize 18 bilinear, centre crop 16" in plain.output and "resize 40 bilinear, centre crop 16" in given.output
    assert plain.output.split("loss ")[1] != given.output.split("loss ")[1]
