"""torchvision models behind the zoo's interface (camkd/models/tv.py): stages, heads, torchvision's own keys.

Every listed builder runs on 2 x 3 x 64 x 64 inputs on CPU, with random weights (nothing is downloaded).
Equalities are exact (torch.equal): the head, the plain forward and torchvision's own forward run the
same modules in the same order on the same tensors, which is bitwise deterministic on one CPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import assert_loads_strictly, randomize_buffers

from camkd.errors import CamkdError
from camkd.models import create_model, list_models
from camkd.models.tv import NAMES, build
from camkd.teachers import load_teacher

HEAVY = {"wide_resnet50_2"}  # 67 M parameters: a 270 MB state_dict file
CASES = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in NAMES]
NUM_CLASSES = 7

# side of each feature map on a 64 x 64 input, read off torchvision's definitions: one map per stage, the
# stride-2 stem first (resnet and shufflenet max-pool before their first stage; convnext's stem has stride 4)
MAP_SIDES = {"convnext_tiny": [16, 8, 4, 2], "shufflenet_v2_x0_5": [32, 8, 4, 2], "shufflenet_v2_x1_0": [32, 8, 4, 2]}


def test_names_are_the_issue_list() -> None:
    assert set(NAMES) == {
        "resnet18", "resnet34", "resnet50", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_large",
        "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny",
    }  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_feats_and_head(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, num_classes=NUM_CLASSES).eval()
    assert (model.arch, model.num_classes, model.in_channels) == (f"tv:{name}", NUM_CLASSES, 3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, logits = model(x, is_feat=True)
        plain = model(x)
        head = model.get_head()
        head_logits = head(feats[-2])
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.equal(plain, logits)
    assert torch.equal(head_logits, logits)

    *maps, pooled = feats
    assert all(f.dim() == 4 and f.shape[-2] == f.shape[-1] for f in maps)
    assert [f.shape[-1] for f in maps] == MAP_SIDES.get(name, [32, 16, 8, 4, 2])
    assert pooled.shape == (2, maps[-1].shape[1])

    model_ptrs = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in model_ptrs for p in head.parameters())
    assert not any(child is head for child in model.children())
    head_sd = head.state_dict()
    assert set(head_sd) <= set(model.state_dict())
    classifier = [k for k, v in head_sd.items() if v.dim() == 2][-1]  # what teachers.py reads num_classes from
    assert head_sd[classifier].shape[0] == NUM_CLASSES


@pytest.mark.parametrize("name", CASES)
def test_loads_torchvision_state_dict_strictly(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
    randomize_buffers(reference)
    path = tmp_path / "weights.pth"
    assert_loads_strictly(build(name, num_classes=NUM_CLASSES), reference, path)


@pytest.mark.parametrize("name", CASES)
def test_train_mode_backward_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(2)
    model = build(name, num_classes=NUM_CLASSES).train()
    feats, logits = model(torch.randn(2, 3, 64, 64), is_feat=True)
    (logits.logsumexp(1).sum() + feats[-2].pow(2).mean() + feats[2].pow(2).mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", CASES)
def test_in_channels_replaces_only_the_first_conv(name: str) -> None:
    torch.manual_seed(3)
    rgb = build(name, num_classes=NUM_CLASSES).state_dict()
    six = build(name, num_classes=NUM_CLASSES, in_channels=6).state_dict()
    assert list(rgb) == list(six)
    changed = [k for k in rgb if rgb[k].shape != six[k].shape]
    assert len(changed) == 1
    key = changed[0]
    assert rgb[key].shape[1] == 3 and six[key].shape[1] == 6 and rgb[key].shape[0] == six[key].shape[0]
    # the family's init: fan-out based or fixed std, so the same spread; shufflenet keeps PyTorch's fan-in default
    expected = 0.5**0.5 if name.startswith("shufflenet") else 1.0
    assert six[key].std() / rgb[key].std() == pytest.approx(expected, rel=0.15)

    gray = build(name, num_classes=NUM_CLASSES, in_channels=1).eval()
    with torch.no_grad():
        assert gray(torch.randn(2, 1, 64, 64)).shape == (2, NUM_CLASSES)


def test_unknown_name_lists_the_names() -> None:
    with pytest.raises(CamkdError) as info:
        build("resnet9000", num_classes=NUM_CLASSES)
    message = str(info.value)
    assert "\n" not in message and "'resnet9000'" in message
    assert all(name in message for name in NAMES)


def test_registered_as_tv_archs(cli) -> None:
    tv_names = [f"tv:{n}" for n in NAMES]
    assert set(tv_names) <= set(list_models())
    result = cli("models")
    assert result.exit_code == 0 and set(tv_names) <= set(result.output.split())
    model = create_model("TV:ResNet18", num_classes=NUM_CLASSES, in_channels=1)
    assert (model.arch, model.num_classes, model.in_channels) == ("tv:resnet18", NUM_CLASSES, 1)
    with pytest.raises(CamkdError, match=r"unknown arch 'tv:resnet9000'.*tv:convnext_tiny"):
        create_model("tv:resnet9000", num_classes=NUM_CLASSES)


def test_teacher_from_torchvision_weights(tmp_path: Path) -> None:
    """``-t tv:NAME=PATH``: num_classes and in_channels read off the weights, torchvision's logits."""
    torch.manual_seed(4)
    reference = torchvision.models.get_model("mobilenet_v3_large", weights=None, num_classes=NUM_CLASSES)
    randomize_buffers(reference)
    path = tmp_path / "teacher.pth"
    torch.save({"model": reference.state_dict()}, path)
    bare = tmp_path / "bare.pth"
    torch.save(reference.state_dict(), bare)  # torchvision's own format: the state_dict alone
    x = torch.randn(2, 3, 64, 64)
    for file in (path, bare):
        teacher = load_teacher(f"tv:mobilenet_v3_large={file}")
        assert (teacher.arch, teacher.num_classes, teacher.in_channels) == ("tv:mobilenet_v3_large", NUM_CLASSES, 3)
        with torch.no_grad():
            assert torch.equal(teacher.model(x), reference.eval()(x))


def test_importing_the_models_leaves_torchvision_unloaded() -> None:
    """torchvision is imported when a tv: model is built, not by every CLI start (about 1.5 s)."""
    code = "import sys, camkd.models; assert 'torchvision' not in sys.modules, 'torchvision imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
