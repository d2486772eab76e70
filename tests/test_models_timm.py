"""timm models behind the zoo's interface (camkd/models/timm_models.py): timm's feats, head and state_dict keys.

Small CNNs on 2 x 3 x 64 x 64 inputs on CPU, random weights (nothing is downloaded). Equalities are exact
(torch.equal): the head, the plain forward and timm's own forward run the same modules in the same order on
the same tensors, which is bitwise deterministic on one CPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_loads_strictly, randomize_buffers

from camkd.errors import CamkdError
from camkd.models import MODELS, create_model, resolve_arch
from camkd.models.timm_models import TimmModel, build
from camkd.teachers import load_teacher

timm = pytest.importorskip("timm")

NAMES = ["resnet18", "mobilenetv3_small_050", "efficientnet_b0"]
NUM_CLASSES = 7
# timm's forward_intermediates maps on a 64 x 64 input (stride 2 to 32), then forward_features' map where it is
# another one (efficientnet's conv_head after its last stage; the others end on their last stage's map)
MAP_SIDES = {"resnet18": [32, 16, 8, 4, 2], "mobilenetv3_small_050": [32, 16, 8, 4, 2], "efficientnet_b0": [32, 16, 8, 4, 2, 2]}
HEAD_KEYS = {  # the children timm's forward_head runs: mobilenetv3's conv_head comes after the pool
    "resnet18": {"fc.weight", "fc.bias"},
    "mobilenetv3_small_050": {"conv_head.weight", "conv_head.bias", "classifier.weight", "classifier.bias"},
    "efficientnet_b0": {"classifier.weight", "classifier.bias"},
}


@pytest.mark.parametrize("name", NAMES)
def test_feats_and_head(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(f"timm:{name}", num_classes=NUM_CLASSES).eval()
    assert (model.arch, model.num_classes, model.in_channels) == (f"timm:{name}", NUM_CLASSES, 3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, logits = model(x, is_feat=True)
        plain = model(x)
        head = model.get_head().eval()
        head_logits = head(feats[-2])
        own = model.net(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.equal(plain, logits) and torch.equal(head_logits, logits) and torch.equal(own, logits)

    *maps, pooled = feats
    assert [f.shape[-1] for f in maps] == MAP_SIDES[name] and all(f.dim() == 4 for f in maps)
    assert maps[-1].shape[1] == model.net.num_features and pooled.shape == (2, model.net.head_hidden_size)

    assert set(head.state_dict()) == HEAD_KEYS[name]
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in model_ptrs for p in head.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_loads_timm_state_dict_strictly(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    randomize_buffers(reference)
    path = tmp_path / "weights.pth"
    assert_loads_strictly(build(name, num_classes=NUM_CLASSES), reference, path)

    teacher = load_teacher(f"timm:{name}={path}")  # the bare state_dict: num_classes and in_channels read off it
    assert (teacher.arch, teacher.num_classes, teacher.in_channels) == (f"timm:{name}", NUM_CLASSES, 3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(teacher.model(x), reference(x))


def test_train_mode_and_device_moves_reach_timm_own_model() -> None:
    """The wrapper's state is timm's: train()/eval() switch the root's dropout, .to() moves what timm reads."""
    torch.manual_seed(2)
    model = build("resnet18", num_classes=NUM_CLASSES)
    model.net.drop_rate = 0.5  # timm's resnet drops after the pool when its root module is training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model.train()(x))
        assert torch.equal(model.eval()(x), model.eval()(x))
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.net.parameters())
    assert model.eval()(x.double()).dtype == torch.float64


def test_a_model_with_parameters_of_its_own_root() -> None:
    """A ViT keeps cls_token and pos_embed on its root module: the wrapper's state_dict is timm's (keys and order),
    its head holds all of it, and what torch replaces on the wrapper alone (.to()'s buffers, assign=True's
    parameters, functional_call's tensors) is what timm's own module runs on."""
    from camkd.memory import activation_bytes
    from camkd.models import CifarModel, Classifier

    torch.manual_seed(5)
    name = "vit_tiny_patch16_224"
    reference = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, img_size=32, patch_size=8).eval()
    model = TimmModel(timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, img_size=32, patch_size=8),
                      arch=f"timm:{name}", num_classes=NUM_CLASSES, in_channels=3).eval()
    assert isinstance(model, Classifier) and not isinstance(model, CifarModel)
    assert list(model.state_dict()) == list(reference.state_dict())
    assert [n for n, _ in model.named_parameters(recurse=False)] == ["cls_token", "pos_embed"]
    model.load_state_dict(reference.state_dict(), assign=True)  # new Parameters on the wrapper alone
    assert model.net.cls_token is not model.cls_token
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x)) and model.net.cls_token is model.cls_token
        feats, logits = model(x, is_feat=True)
        head = model.get_head().eval()
        assert list(head.state_dict()) == list(model.state_dict()) and torch.equal(head(feats[-2]), logits)
        assert activation_bytes(model, 3, 32) is not None  # functional_call's meta tensors reach timm's module
        assert torch.equal(model(x), logits) and model.net.pos_embed is model.pos_embed
        model.to(torch.float64)
        assert model.net.cls_token.dtype == torch.float64 and model(x.double()).dtype == torch.float64


def test_in_channels_and_case() -> None:
    model = create_model("TIMM:ResNet18", num_classes=NUM_CLASSES, in_channels=1)
    assert (model.arch, model.in_channels, resolve_arch("timm:RESNET18")) == ("timm:resnet18", 1, "timm:resnet18")
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 64, 64)).shape == (2, NUM_CLASSES)


def test_unknown_timm_name_is_one_error(cli) -> None:
    with pytest.raises(CamkdError) as info:
        create_model("timm:resnet9000", num_classes=NUM_CLASSES)
    assert "\n" not in str(info.value) and "'timm:resnet9000'" in str(info.value)
    result = cli("models")
    assert result.exit_code == 0 and "timm:NAME (any timm model; pip install 'camkd[timm]')" in result.output.splitlines()
    assert MODELS.families() == ["timm:NAME (any timm model; pip install 'camkd[timm]')"]


def test_without_timm_one_error_says_how_to_install() -> None:
    """A timm: name with timm not importable: the one-line install hint (timm blocked in a fresh interpreter)."""
    code = ("import sys; sys.modules['timm'] = None\n"
            "from camkd.errors import CamkdError\nfrom camkd.models import create_model\n"
            "try:\n    create_model('timm:resnet18', num_classes=3)\nexcept CamkdError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout == "timm:resnet18 needs timm: pip install 'camkd[timm]'\n"


def test_importing_the_models_leaves_timm_unloaded() -> None:
    code = "import sys, camkd.models; assert 'timm' not in sys.modules, 'timm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
