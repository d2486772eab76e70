"""docs/imagenet.md's subset and fine-tuning walk-throughs, as written, at a small size, offline.

The commands are read from the document's bash blocks; the test shrinks them (a 3-wnid image folder at 32 px, 2 views
and 2 epochs, batch 8) and swaps the published teachers for smaller ones it can fake offline: random-init weights
placed where torchvision and timm keep published files (torchvision's records pointed at file names carrying the
files' sha256 prefixes, as tests/test_named_weights.py does; timm's in a hand-laid Hugging Face cache, as
tests/test_timm_weights.py does). What this cannot check: the real downloads and the accuracies of the real weights.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import torchvision
from folder_helpers import make_folder
from weights_helpers import fake_published, offline_torch_hub

from camkd.checkpoint import load_checkpoint
from camkd.store import open_store

timm = pytest.importorskip("timm")

DOC = Path(__file__).resolve().parents[1] / "docs" / "imagenet.md"
WNIDS = ("n01440764", "n02102040", "n03000134")
SWAP = {  # the document's teachers -> ones made here (torchvision enum, builder) or timm's small resnet10t
    "tv:resnet50@IMAGENET1K_V2": ("tv:resnet18@IMAGENET1K_V1", torchvision.models.ResNet18_Weights.IMAGENET1K_V1, "resnet18"),
    "tv:convnext_tiny@IMAGENET1K_V1": ("tv:mobilenet_v3_large@IMAGENET1K_V1",
                                       torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1, "mobilenet_v3_large"),
    "timm:resnet50.a1_in1k": ("timm:resnet10t.c3_in1k", None, None),
}


def blocks() -> list[list[str]]:
    """Each bash block of the document as its commands (continuation lines joined, comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        out.append([line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")])
    return out


@pytest.fixture
def published(tmp_path, monkeypatch):
    """Offline caches holding the swapped-in teachers' fake published files."""
    import safetensors.torch
    from test_timm_weights import put_in_cache, random_state

    offline_torch_hub(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)

    for i, (_, weights, builder) in enumerate(v for v in SWAP.values() if v[1] is not None):
        fake_published(tmp_path, monkeypatch, weights, builder, seed=i)
    put_in_cache(tmp_path / "hf" / "hub", safetensors.torch.save(random_state(5)))


def shrink(cmd: str, root: Path, tmp: Path) -> list[str]:
    """One documented command at test size: the data, teachers, views, epochs and batch swapped; in ``tmp``."""
    for doc, (ours, _, _) in SWAP.items():
        cmd = cmd.replace(doc, ours)
    for folder in ("imagenette2-320", "CUB"):
        cmd = cmd.replace(f"--data-dir {folder}", f"--data-dir {root}")
    cmd = re.sub(r"-V \d+", "-V 2", cmd)
    cmd = re.sub(r"--epochs \d+", "--epochs 2 --batch-size 8", cmd)
    cmd = re.sub(r"--image-size \d+", "--image-size 32", cmd)
    cmd = cmd.replace("-m tv:resnet18 ", "-m resnet8 ")  # the student: the CIFAR zoo's smallest
    args = shlex.split(cmd)
    assert args[0] == "camkd"
    args = args[1:]
    if args[0] in ("cache-teachers", "train-teacher"):
        args += ["--workers", "0"] + (["--image-size", "32"] if "--image-size" not in args else [])
        args += ["--batch-size", "8"] if args[0] == "cache-teachers" else []
    if args[0] in ("distill",):
        args += ["--workers", "0", "--out", str(tmp / "student")]
    if args[0] == "train-teacher":
        args += ["--epochs", "1", "--batch-size", "8", "--out", str(tmp / f"teacher_{args[args.index('--trial') + 1]}")]
    return [str(tmp / a) if a.startswith("cache/") else a for a in args]


def test_the_subset_walkthrough_runs_as_written(cli, published, tmp_path):
    subset = next(b for b in blocks() if any("imagenette2-320" in c for c in b))
    root = make_folder(tmp_path / "data", classes=WNIDS)
    ran = []
    for cmd in subset:
        if "tiny-imagenet-200" in cmd:  # the same command on another folder: checked by the first one
            continue
        args = shrink(cmd, root, tmp_path)
        r = cli(*args)
        assert r.exit_code == 0, (args, r.output)
        ran.append(args[0])
        if args[0] == "cache-teachers":  # measured beside published, for the torchvision teachers (timm publishes none)
            assert re.search(r"teacher test top-1 \(%\): [\d.]+ \(published 69.76 on ImageNet-1k\) / [\d.]+ \(published "
                             r"74.04 on ImageNet-1k\) / [\d.]+\n", r.output), r.output
    assert ran == ["evaluate", "cache-teachers", "distill"]
    st = open_store(tmp_path / "cache" / "nette.zarr")
    assert [t.num_classes for t in st.description.teachers] == [3, 3, 3]
    assert all(t.class_rows is not None for t in st.description.teachers)
    assert st.description.teachers[2].weights == "timm/resnet10t.c3_in1k"
    meta = load_checkpoint(tmp_path / "student" / "last.pth")["meta"]
    assert meta["epoch"] == 2
    assert [t["weights"] for t in meta["teacher_weights"]] == ["ResNet18_Weights.IMAGENET1K_V1",
                                                               "MobileNet_V3_Large_Weights.IMAGENET1K_V1", "timm/resnet10t.c3_in1k"]


def test_the_fine_tuning_walkthrough_runs_as_written(cli, published, tmp_path):
    finetune = next(b for b in blocks() if any("train-teacher" in c for c in b))
    root = make_folder(tmp_path / "data")  # CUB's place: classes that are not ImageNet's
    (loop,) = finetune
    body = re.fullmatch(r"for t in ([\d ]+); do (.*); done", loop)
    assert body, loop
    for t in body.group(1).split()[:2]:  # two of the trials
        args = shrink(body.group(2).replace("$t", t), root, tmp_path)
        r = cli(*args)
        assert r.exit_code == 0, (args, r.output)
        assert "fine-tuning from ResNet18_Weights.IMAGENET1K_V1" in r.output
    a, b = (load_checkpoint(tmp_path / f"teacher_{t}" / "last.pth") for t in "01")
    assert a["meta"]["pretrained"]["name"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert not torch.equal(a["model"]["fc.weight"], b["model"]["fc.weight"])  # each trial its own new classifier
