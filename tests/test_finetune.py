"""train-teacher from published weights (issue 25): ``--arch tv:NAME@WEIGHTS`` fine-tunes, with a new classifier for
the data's classes, or, on an ImageNet subset (wnid class folders), the published classifier's rows of those classes.

Offline, as tests/test_named_weights.py: a temporary TORCH_HOME, downloads fail, and a random-init resnet18 saved
under a name carrying its own sha256 prefix, torchvision's ResNet18_Weights.IMAGENET1K_V1 record pointed at it.
With ``--lr 0`` (and so no weight decay step) the trained parameters stay the starting ones, which are compared.
"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from folder_helpers import make_folder
from weights_helpers import fake_published, offline_torch_hub

from camkd.checkpoint import load_checkpoint, sha256_file

pytest.importorskip("timm")  # the wnid list

R18 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
WNIDS = ("n01440764", "n01443537", "n01484850")


@pytest.fixture
def published(tmp_path, monkeypatch):
    """The fake published resnet18: (its state_dict, its file)."""
    offline_torch_hub(tmp_path, monkeypatch)
    return fake_published(tmp_path, monkeypatch, R18, "resnet18", seed=7)


def _train(cli, arch, root, out, *extra):
    r = cli("train-teacher", "--arch", arch, "--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "32",
            "--workers", "0", "--epochs", "1", "--batch-size", "8", "--lr", "0", "--device", "cpu", "--out", str(out), *extra)
    assert r.exit_code == 0, r.output
    return r, load_checkpoint(out / "last.pth")


def _params(ckpt) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt["model"].items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_on_an_imagenet_subset_the_classifier_keeps_the_wnid_rows(cli, published, tmp_path):
    from timm.data import ImageNetInfo

    state, path = published
    root = make_folder(tmp_path / "data", classes=WNIDS)
    r, ckpt = _train(cli, "tv:resnet18@IMAGENET1K_V1", root, tmp_path / "run")
    rows = [list(ImageNetInfo().label_names()).index(w) for w in WNIDS]
    assert "fine-tuning from ResNet18_Weights.IMAGENET1K_V1" in r.output and "keeping the rows of the 3 ImageNet-1k" in r.output
    params = _params(ckpt)
    assert torch.equal(params["fc.weight"], state["fc.weight"][rows]) and torch.equal(params["fc.bias"], state["fc.bias"][rows])
    assert all(torch.equal(v, state[k]) for k, v in params.items() if not k.startswith("fc."))
    meta = ckpt["meta"]
    assert meta["arch"] == "tv:resnet18" and meta["num_classes"] == 3
    assert meta["pretrained"] == {"name": "ResNet18_Weights.IMAGENET1K_V1", "spec": "tv:resnet18@IMAGENET1K_V1",
                                  "path": str(path), "sha256": sha256_file(path), "class_rows": rows,
                                  "classifier": "published"}
    # evaluate equals training for a fine-tuned run
    e = cli("evaluate", str(tmp_path / "run" / "last.pth"), "--json")
    assert e.exit_code == 0, e.output
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads(e.output)["top1"] == last["test_top1"]


def test_imagenet_itself_keeps_the_whole_classifier(cli, published, tmp_path):
    """1000 wnid folders (ImageNet-1k's classes): the published classifier is the data's, kept whole."""
    from test_evaluate_published import _write_images
    from timm.data import ImageNetInfo

    state, _ = published
    root = _write_images(tmp_path / "in1k", ImageNetInfo().label_names(), per_class=1, sizes=(8, 12))
    r, ckpt = _train(cli, "tv:resnet18@IMAGENET1K_V1", root, tmp_path / "run", "--limit", "16", "--image-size", "16")
    assert "keeping its classifier (the data's classes are its own)" in r.output
    params = _params(ckpt)
    assert all(torch.equal(v, state[k]) for k, v in params.items())  # every tensor, the classifier too
    assert ckpt["meta"]["pretrained"]["classifier"] == "published" and ckpt["meta"]["pretrained"]["class_rows"] is None


def test_other_classes_get_a_new_seeded_classifier(cli, published, tmp_path):
    state, _ = published
    root = make_folder(tmp_path / "data")  # ant, bee, cat: no ImageNet subset
    r, ckpt = _train(cli, "tv:resnet18@IMAGENET1K_V1", root, tmp_path / "ft", "--seed", "3")
    assert "a new classifier for imagefolder's 3 classes" in r.output
    _, scratch = _train(cli, "tv:resnet18", root, tmp_path / "scratch", "--seed", "3")
    params, fresh = _params(ckpt), _params(scratch)
    assert params["fc.weight"].shape == (3, 512)
    assert torch.equal(params["fc.weight"], fresh["fc.weight"]) and torch.equal(params["fc.bias"], fresh["fc.bias"])
    assert all(torch.equal(v, state[k]) for k, v in params.items() if not k.startswith("fc."))
    assert ckpt["meta"]["pretrained"]["class_rows"] is None and ckpt["meta"]["pretrained"]["classifier"] == "new"
    odd = make_folder(tmp_path / "odd", classes=("cats", "n01440764", "n01443537"))  # a typo'd wnid, say
    r, _ = _train(cli, "tv:resnet18@IMAGENET1K_V1", odd, tmp_path / "odd_run")
    assert "a new classifier for imagefolder's 3 classes (cats is not an ImageNet wnid)" in r.output


def test_a_resumed_fine_tune_needs_no_weights_file(cli, published, tmp_path):
    """The weights are the start of a new run only: a resume reads its checkpoint (and keeps the record)."""
    _, path = published
    root = make_folder(tmp_path / "data", classes=WNIDS)
    _train(cli, "tv:resnet18@IMAGENET1K_V1", root, tmp_path / "run")
    path.unlink()
    r = cli("train-teacher", "--arch", "tv:resnet18@IMAGENET1K_V1", "--dataset", "imagefolder", "--data-dir", str(root),
            "--image-size", "32", "--workers", "0", "--epochs", "2", "--batch-size", "8", "--lr", "0", "--device", "cpu",
            "--out", str(tmp_path / "run"), "--resume")
    assert r.exit_code == 0, r.output
    meta = load_checkpoint(tmp_path / "run" / "last.pth")["meta"]
    assert meta["epoch"] == 2 and meta["pretrained"]["name"] == "ResNet18_Weights.IMAGENET1K_V1"


def test_missing_weights_is_one_line_and_leaves_no_run_folder(cli, one_error, published, tmp_path):
    _, path = published
    path.unlink()
    root = make_folder(tmp_path / "data")
    one_error(cli("train-teacher", "--arch", "tv:resnet18@IMAGENET1K_V1", "--dataset", "imagefolder", "--data-dir", str(root),
                  "--image-size", "32", "--workers", "0", "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run")),
              r"ResNet18_Weights.IMAGENET1K_V1 is not in torch.hub's cache")
    assert not (tmp_path / "run").exists()


def test_a_timm_tag_fine_tunes_too(cli, tmp_path, monkeypatch):
    """timm:NAME.TAG from a hand-laid Hugging Face cache (tests/test_timm_weights.py): the wnid rows kept, the rest
    the published tensors."""
    import safetensors.torch
    from test_timm_weights import SPEC, put_in_cache, random_state
    from timm.data import ImageNetInfo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    state = random_state(3)
    put_in_cache(tmp_path / "hf" / "hub", safetensors.torch.save(state))
    root = make_folder(tmp_path / "data", classes=WNIDS)
    r, ckpt = _train(cli, SPEC, root, tmp_path / "run")
    rows = [list(ImageNetInfo().label_names()).index(w) for w in WNIDS]
    params = _params(ckpt)
    assert torch.equal(params["fc.weight"], state["fc.weight"][rows])
    assert all(torch.equal(v, state[k]) for k, v in params.items() if not k.startswith("fc."))
    assert ckpt["meta"]["arch"] == "timm:resnet10t" and ckpt["meta"]["pretrained"]["class_rows"] == rows
