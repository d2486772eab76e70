"""Tests for the CIFAR model zoo: interface, heads, and checkpoint-key compatibility.

The expected ``state_dict`` listings below are written from the reference
architectures (HobbitLong/RepDistiller ``models/*.py``, as registered by Rorozhl/CA-MKD)
and never call camkd's model code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from camkd.errors import CamkdError
from camkd.models import create_model, list_models

Shapes = dict[str, tuple[int, ...]]

ALL_ARCHS = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2",
]  # fmt: skip

NUM_CLASSES = 100


# ---------------------------------------------------------------- reference listings
def _conv(name: str, out: int, inp: int, k: int, bias: bool = False) -> Shapes:
    keys: Shapes = {f"{name}.weight": (out, inp, k, k)}
    if bias:
        keys[f"{name}.bias"] = (out,)
    return keys


def _bn(name: str, c: int) -> Shapes:
    return {
        f"{name}.weight": (c,),
        f"{name}.bias": (c,),
        f"{name}.running_mean": (c,),
        f"{name}.running_var": (c,),
        f"{name}.num_batches_tracked": (),
    }


def _linear(name: str, out: int, inp: int) -> Shapes:
    return {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}


def ref_resnet(depth: int, filters: tuple[int, int, int, int]) -> Shapes:
    """RepDistiller ResNet: conv1/bn1 stem, layer1-3 of (depth-2)/6 BasicBlocks, fc."""
    n = (depth - 2) // 6
    keys = {**_conv("conv1", filters[0], 3, 3), **_bn("bn1", filters[0])}
    inplanes = filters[0]
    for stage, (planes, stride) in enumerate(zip(filters[1:], (1, 2, 2)), start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            cin = inplanes if i == 0 else planes
            keys |= _conv(f"{p}.conv1", planes, cin, 3) | _bn(f"{p}.bn1", planes)
            keys |= _conv(f"{p}.conv2", planes, planes, 3) | _bn(f"{p}.bn2", planes)
            if i == 0 and (stride != 1 or inplanes != planes):
                keys |= _conv(f"{p}.downsample.0", planes, inplanes, 1)
                keys |= _bn(f"{p}.downsample.1", planes)
        inplanes = planes
    return keys | _linear("fc", NUM_CLASSES, filters[3])


def ref_wrn(depth: int, k: int) -> Shapes:
    """WideResNet: conv1, block1-3.layer.<i> pre-act blocks (convShortcut when widths differ), bn1, fc."""
    n = (depth - 4) // 6
    widths = (16, 16 * k, 32 * k, 64 * k)
    keys = _conv("conv1", 16, 3, 3)
    for stage in (1, 2, 3):
        cin, cout = widths[stage - 1], widths[stage]
        for i in range(n):
            p = f"block{stage}.layer.{i}"
            inp = cin if i == 0 else cout
            keys |= _bn(f"{p}.bn1", inp) | _conv(f"{p}.conv1", cout, inp, 3)
            keys |= _bn(f"{p}.bn2", cout) | _conv(f"{p}.conv2", cout, cout, 3)
            if inp != cout:
                keys |= _conv(f"{p}.convShortcut", cout, inp, 1)
    return keys | _bn("bn1", widths[3]) | _linear("fc", NUM_CLASSES, widths[3])


def ref_vgg(cfg: list[list[int]]) -> Shapes:
    """VGG-BN: block<b> = Sequential(conv(bias), BN, ReLU, ..., conv, BN) -> indices 0,1,3,4,..."""
    keys: Shapes = {}
    cin = 3
    for b, widths in enumerate(cfg):
        for j, w in enumerate(widths):
            keys |= _conv(f"block{b}.{3 * j}", w, cin, 3, bias=True) | _bn(f"block{b}.{3 * j + 1}", w)
            cin = w
    return keys | _linear("classifier", NUM_CLASSES, 512)


def ref_mobile_half() -> Shapes:
    """mobile_half: T=6, width 0.5; conv1=Seq(conv,bn,relu); blocks[i][j].conv.{0,1,3,4,6,7}."""
    setting = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]
    keys = _conv("conv1.0", 16, 3, 3) | _bn("conv1.1", 16)
    inp = 16
    for i, (t, c, reps) in enumerate(setting):
        oup = c // 2
        for j in range(reps):
            p, hid = f"blocks.{i}.{j}.conv", inp * t
            keys |= _conv(f"{p}.0", hid, inp, 1) | _bn(f"{p}.1", hid)
            keys |= _conv(f"{p}.3", hid, 1, 3) | _bn(f"{p}.4", hid)
            keys |= _conv(f"{p}.6", oup, hid, 1) | _bn(f"{p}.7", oup)
            inp = oup
    keys |= _conv("conv2.0", 1280, 160, 1) | _bn("conv2.1", 1280)
    return keys | _linear("classifier.0", NUM_CLASSES, 1280)


def ref_shufflev1() -> Shapes:
    """ShuffleV1 (groups 3): the stride-2 first block of each stage outputs out-in channels."""
    keys = _conv("conv1", 24, 3, 1) | _bn("bn1", 24)
    inp = 24
    for stage, (out, blocks) in enumerate(zip((240, 480, 960), (4, 8, 4)), start=1):
        for i in range(blocks):
            p, o = f"layer{stage}.{i}", (out - inp if i == 0 else out)
            mid, g1 = o // 4, (1 if inp == 24 else 3)
            keys |= _conv(f"{p}.conv1", mid, inp // g1, 1) | _bn(f"{p}.bn1", mid)
            keys |= _conv(f"{p}.conv2", mid, 1, 3) | _bn(f"{p}.bn2", mid)
            keys |= _conv(f"{p}.conv3", o, mid // 3, 1) | _bn(f"{p}.bn3", o)
            inp = out
    return keys | _linear("linear", NUM_CLASSES, 960)


def ref_shufflev2() -> Shapes:
    """ShuffleV2 (size 1): layer<s>.0 DownBlock (conv1-5), then BasicBlocks on half the channels."""
    keys = _conv("conv1", 24, 3, 1) | _bn("bn1", 24)
    inp = 24
    for stage, (out, blocks) in enumerate(zip((116, 232, 464), (3, 7, 3)), start=1):
        p, mid = f"layer{stage}.0", out // 2
        keys |= _conv(f"{p}.conv1", inp, 1, 3) | _bn(f"{p}.bn1", inp)
        keys |= _conv(f"{p}.conv2", mid, inp, 1) | _bn(f"{p}.bn2", mid)
        keys |= _conv(f"{p}.conv3", mid, inp, 1) | _bn(f"{p}.bn3", mid)
        keys |= _conv(f"{p}.conv4", mid, 1, 3) | _bn(f"{p}.bn4", mid)
        keys |= _conv(f"{p}.conv5", mid, mid, 1) | _bn(f"{p}.bn5", mid)
        for i in range(1, blocks + 1):
            p = f"layer{stage}.{i}"
            keys |= _conv(f"{p}.conv1", mid, mid, 1) | _bn(f"{p}.bn1", mid)
            keys |= _conv(f"{p}.conv2", mid, 1, 3) | _bn(f"{p}.bn2", mid)
            keys |= _conv(f"{p}.conv3", mid, mid, 1) | _bn(f"{p}.bn3", mid)
        inp = out
    keys |= _conv("conv2", 1024, 464, 1) | _bn("bn2", 1024)
    return keys | _linear("linear", NUM_CLASSES, 1024)


# Listing, key count and parameter count (num_classes=100) of the reference models.
REFERENCE = {
    "resnet8": (lambda: ref_resnet(8, (16, 16, 32, 64)), 56, 83_892),
    "resnet8x4": (lambda: ref_resnet(8, (32, 64, 128, 256)), 62, 1_233_540),
    "resnet32x4": (lambda: ref_resnet(32, (32, 64, 128, 256)), 206, 7_433_860),
    "wrn_40_2": (lambda: ref_wrn(40, 2), 227, 2_255_156),
    "vgg8": (lambda: ref_vgg([[64], [128], [256], [512], [512]]), 37, 3_965_028),
    "vgg13": (
        lambda: ref_vgg([[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]),
        72,
        9_462_180,
    ),
    "MobileNetV2": (ref_mobile_half, 320, 812_836),
    "ShuffleV1": (ref_shufflev1, 296, 949_258),
    "ShuffleV2": (ref_shufflev2, 338, 1_355_528),
}

# A few hand-checked entries, as literal data.
SPOT_CHECKS: dict[str, Shapes] = {
    "resnet8x4": {"layer1.0.downsample.0.weight": (64, 32, 1, 1), "fc.weight": (100, 256)},
    "resnet32x4": {"layer3.4.conv2.weight": (256, 256, 3, 3), "layer3.0.downsample.1.running_var": (256,)},
    "wrn_40_2": {"block1.layer.0.convShortcut.weight": (32, 16, 1, 1), "bn1.weight": (128,)},
    "vgg8": {"block4.0.weight": (512, 512, 3, 3), "block0.0.bias": (64,), "classifier.weight": (100, 512)},
    "MobileNetV2": {"blocks.0.0.conv.0.weight": (16, 16, 1, 1), "blocks.6.0.conv.6.weight": (160, 480, 1, 1)},
    "ShuffleV1": {"layer1.0.conv1.weight": (54, 24, 1, 1), "layer1.0.conv3.weight": (216, 18, 1, 1),
                  "layer2.0.conv1.weight": (60, 80, 1, 1)},
    "ShuffleV2": {"layer3.0.conv1.weight": (232, 1, 3, 3), "layer3.3.conv3.weight": (232, 232, 1, 1)},
}  # fmt: skip


def _shapes(sd: dict[str, torch.Tensor]) -> Shapes:
    return {k: tuple(v.shape) for k, v in sd.items()}


# ---------------------------------------------------------------- tests
def test_registry_lists_every_arch() -> None:
    assert [n for n in list_models() if not n.startswith("tv:")] == sorted(ALL_ARCHS)  # tv: in test_models_tv.py


def test_every_model_is_a_classifier_and_only_the_cifar_zoo_a_cifar_model() -> None:
    """One base for every kind of model (base.py's contract); CifarModel is the CIFAR zoo's own."""
    from camkd.models import CifarModel, Classifier

    for arch, cifar in (("resnet8", True), ("ShuffleV2", True), ("tv:shufflenet_v2_x0_5", False)):
        model = create_model(arch, num_classes=3)
        assert isinstance(model, Classifier) and isinstance(model, CifarModel) == cifar, arch


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_forward_features_and_head(arch: str) -> None:
    torch.manual_seed(0)
    for size, channels in ((28, 1), (32, 3)):
        model = create_model(arch, num_classes=10, in_channels=channels).eval()
        assert (model.arch, model.num_classes, model.in_channels) == (arch, 10, channels)
        x = torch.randn(2, channels, size, size)
        with torch.no_grad():
            feats, logits = model(x, is_feat=True)
            plain = model(x)
            head = model.get_head()
            head_logits = head(feats[-2])
        assert logits.shape == (2, 10)
        assert torch.equal(plain, logits)
        assert feats[-2].dim() == 4 and feats[-1].dim() == 2
        assert torch.allclose(head_logits, logits, atol=1e-5, rtol=1e-5)

        model_ptrs = {p.data_ptr() for p in model.parameters()}
        head_params = list(head.parameters())
        assert head_params and all(p.data_ptr() in model_ptrs for p in head_params)
        assert not any(child is head for child in model.children())
        assert set(head.state_dict()) <= set(model.state_dict())


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_head_weights_load_into_fresh_head(arch: str) -> None:
    torch.manual_seed(1)
    source = create_model(arch, num_classes=7)
    keys_before = list(source.state_dict())
    head_sd = source.get_head().state_dict()
    assert list(source.state_dict()) == keys_before  # get_head() adds no child

    target = create_model(arch, num_classes=7)
    target_head = target.get_head()
    target_head.load_state_dict(head_sd)  # strict
    for key, value in head_sd.items():  # shared storage: the model itself changed
        assert torch.equal(target.state_dict()[key], value)
    source.eval()
    target.eval()
    with torch.no_grad():
        feat = torch.randn(2, *source(torch.randn(1, 3, 32, 32), is_feat=True)[0][-2].shape[1:])
        assert torch.allclose(source.get_head()(feat), target_head(feat))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_train_mode_backward_reaches_every_parameter(arch: str) -> None:
    model = create_model(arch, num_classes=10, in_channels=1).train()
    feats, logits = model(torch.randn(2, 1, 28, 28), is_feat=True)
    (logits.logsumexp(1).sum() + feats[-2].pow(2).mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(REFERENCE))
def test_state_dict_matches_reference(arch: str) -> None:
    build, n_keys, n_params = REFERENCE[arch]
    expected = build()
    model = create_model(arch, num_classes=NUM_CLASSES)
    assert len(expected) == n_keys
    assert _shapes(model.state_dict()) == expected
    assert sum(p.numel() for p in model.parameters()) == n_params
    for key, shape in SPOT_CHECKS.get(arch, {}).items():
        assert expected[key] == shape


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_in_channels_only_changes_first_conv(arch: str) -> None:
    rgb = _shapes(create_model(arch, num_classes=5).state_dict())
    gray = _shapes(create_model(arch, num_classes=5, in_channels=1).state_dict())
    assert rgb.keys() == gray.keys()
    changed = [k for k in rgb if rgb[k] != gray[k]]
    assert len(changed) == 1 and gray[changed[0]][1] == 1 and rgb[changed[0]][1] == 3


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(2)
    source = create_model("resnet8x4", num_classes=NUM_CLASSES)
    with torch.no_grad():
        for buf in source.buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict()}, path)
    target = create_model("resnet8x4", num_classes=NUM_CLASSES)
    target.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source.eval()(x), target.eval()(x))


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(CamkdError) as info:
        create_model("xyz", num_classes=10)
    message = str(info.value)
    assert "\n" not in message and "'xyz'" in message
    assert all(name in message for name in ALL_ARCHS)


def test_bad_sizes_are_user_errors() -> None:
    with pytest.raises(CamkdError):
        create_model("resnet8", num_classes=0)
    with pytest.raises(CamkdError):
        create_model("resnet8", num_classes=10, in_channels=0)


@pytest.mark.parametrize(("query", "arch"), [("RESNET8X4", "resnet8x4"), ("mobilenetv2", "MobileNetV2"),
                                             ("shufflev1", "ShuffleV1"), ("Wrn_40_2", "wrn_40_2")])  # fmt: skip
def test_case_insensitive_lookup(query: str, arch: str) -> None:
    assert create_model(query, num_classes=3).arch == arch


# ---------------------------------------------------------------- one registry shape
@pytest.mark.parametrize("module, registry, kind, name", [
    ("camkd.data", "DATASETS", "dataset", "imagenet"),
    ("camkd.methods", "METHODS", "method", "kdd"),
    ("camkd.models", "MODELS", "arch", "resnet9"),
])
def test_datasets_methods_and_models_share_one_registry(module: str, registry: str, kind: str, name: str) -> None:
    import importlib

    from camkd.registry import Registry

    reg = getattr(importlib.import_module(module), registry)
    assert isinstance(reg, Registry) and reg.kind == kind and reg.names() == sorted(reg.names())
    with pytest.raises(CamkdError) as e:
        reg.get(name)
    assert str(e.value) == f"unknown {kind} '{name}'; choose one of: {', '.join(reg.names())}"
    with pytest.raises(ValueError, match="already registered"):
        reg.add(reg.names()[0], None)


def test_model_names_are_looked_up_case_insensitively() -> None:
    from camkd.models import resolve_arch

    assert resolve_arch("mobilenetv2") == "MobileNetV2" and create_model("RESNET8", num_classes=3).arch == "resnet8"


@pytest.mark.parametrize("module, names, count", [
    ("camkd.data.base", "dataset_names", 4), ("camkd.methods.base", "list_methods", 7),
    ("camkd.models.registry", "list_models", len(ALL_ARCHS)),
])
def test_a_registry_is_full_whichever_module_is_imported_first(module: str, names: str, count: int) -> None:
    """No lazy import fills a registry: importing any module of the package registers every entry."""
    import subprocess
    import sys

    code = f"import {module} as m; print(len(m.{names}()))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and int(r.stdout) >= count, r.stderr[-2000:]
