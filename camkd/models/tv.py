"""torchvision's classification models behind the zoo's interface, registered as archs ``tv:NAME``.

:func:`build` constructs a torchvision model with ``weights=None`` (nothing is ever downloaded) and
wraps it in :class:`TorchvisionModel`, which registers the torchvision model's children as its own,
under the same names: its ``state_dict`` keys are torchvision's, so a state_dict saved from
``torchvision.models.NAME(num_classes=n)`` loads strictly, and its logits are torchvision's own.

Each family's stages and head are read off the model's structure (:data:`FAMILIES`):

- ``feats`` are the stage outputs (resnet: stem before the max-pool, layer1..layer4; shufflenet: conv1, stage2, stage3,
  stage4 + conv5; regnet: stem, block1..block4; ``features``-Sequential families: the last block
  before each block that downsamples, then the last map), followed by the pooled vector, so
  ``feats[L]`` is a real stage for FitNet's hints and ``feats[-2]`` is the map the head reads;
- ``get_head()`` is the family's own pooling + flatten + classifier, sharing the model's parameters.

``in_channels != 3`` replaces the first conv by one with ``in_channels`` inputs (the same shape
otherwise, initialized as the family initializes convs): the zoo takes any channel count (Fashion-MNIST
has one), and a torchvision checkpoint then differs from torchvision's only in that one weight's shape.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from camkd.errors import CamkdError
from camkd.models.base import Classifier, ClassifierHead
from camkd.models.registry import MODELS

Head = OrderedDict[str, nn.Module]


class SpatialMean(nn.Module):
    """``x.mean([2, 3])``: shufflenet's global pool, as a module (no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean([2, 3])


def _downsamples(block: nn.Module) -> bool:
    """Whether a block reduces the spatial size: one of its convs has a stride above 1."""
    return any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in block.modules())


def _sequential_stages(model: nn.Module, prefix: str) -> list[list[str]]:
    """The blocks of Sequential ``prefix`` cut before each block that downsamples (the first block starts a stage)."""
    stages: list[list[str]] = []
    for name, block in model.get_submodule(prefix).named_children():
        if not stages or _downsamples(block):
            stages.append([])
        stages[-1].append(f"{prefix}.{name}")
    return stages


def _resnet_stages(model: nn.Module) -> list[list[str]]:
    return [["conv1", "bn1", "relu"], ["maxpool", "layer1"], ["layer2"], ["layer3"], ["layer4"]]


def _shufflenet_stages(model: nn.Module) -> list[list[str]]:
    return [["conv1"], ["maxpool", "stage2"], ["stage3"], ["stage4", "conv5"]]


def _regnet_stages(model: nn.Module) -> list[list[str]]:
    return [["stem"], *([f"trunk_output.{name}"] for name, _ in model.trunk_output.named_children())]


def _features_stages(model: nn.Module) -> list[list[str]]:
    return _sequential_stages(model, "features")


def _fc_head(model: nn.Module) -> Head:
    """resnet, regnet: avgpool, flatten, fc."""
    return OrderedDict(avgpool=model.avgpool, flatten=nn.Flatten(), fc=model.fc)


def _classifier_head(model: nn.Module) -> Head:
    """mobilenet_v3, efficientnet: avgpool, flatten, the ``classifier`` Sequential (dropout / MLP, then Linear)."""
    return OrderedDict(avgpool=model.avgpool, flatten=nn.Flatten(), classifier=model.classifier)


def _mobilenet_v2_head(model: nn.Module) -> Head:
    """mobilenet_v2 pools functionally (``adaptive_avg_pool2d(x, 1)``): the same op as a new pool module."""
    return OrderedDict(avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), classifier=model.classifier)


def _shufflenet_head(model: nn.Module) -> Head:
    return OrderedDict(mean=SpatialMean(), fc=model.fc)


def _convnext_head(model: nn.Module) -> Head:
    """avgpool, then ``classifier`` = LayerNorm2d, Flatten, Linear (the pooled vector is the flatten's output)."""
    return OrderedDict(avgpool=model.avgpool, classifier=model.classifier)


def _kaiming_fan_out(conv: nn.Conv2d) -> None:
    """resnet / mobilenet / efficientnet / regnet: N(0, 2 / fan_out) (regnet writes it out by hand)."""
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1])))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _trunc_normal(conv: nn.Conv2d) -> None:
    """convnext: truncated N(0, 0.02^2), zero bias."""
    nn.init.trunc_normal_(conv.weight, std=0.02)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _torch_default(conv: nn.Conv2d) -> None:
    """shufflenet keeps PyTorch's default init, which a new Conv2d already has."""


@dataclass(frozen=True)
class Family:
    """Where a torchvision model class keeps its stages and head, and how it initializes its first conv."""

    stages: Callable[[nn.Module], list[list[str]]]  # module paths, grouped by stage; a stage's output is a feature map
    head: Callable[[nn.Module], Head]  # last map -> logits under the model's own names; its first 2-D output is the pooled vector
    init_conv: Callable[[nn.Conv2d], None]


# by torchvision's class name (torchvision itself is imported only when a model is built: ~1.5 s off every CLI start)
FAMILIES: dict[str, Family] = {
    "ResNet": Family(_resnet_stages, _fc_head, _kaiming_fan_out),
    "MobileNetV2": Family(_features_stages, _mobilenet_v2_head, _kaiming_fan_out),
    "MobileNetV3": Family(_features_stages, _classifier_head, _kaiming_fan_out),
    "ShuffleNetV2": Family(_shufflenet_stages, _shufflenet_head, _torch_default),
    "EfficientNet": Family(_features_stages, _classifier_head, _kaiming_fan_out),
    "RegNet": Family(_regnet_stages, _fc_head, _kaiming_fan_out),
    "ConvNeXt": Family(_features_stages, _convnext_head, _trunc_normal),
}

# the torchvision builders offered as tv:NAME (each one's family is in FAMILIES; tests/test_models_tv.py covers every one)
NAMES = (
    "resnet18", "resnet34", "resnet50", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_large",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny",
)  # fmt: skip


def _leaves(modules: Iterable[nn.Module]) -> Iterator[nn.Module]:
    """The modules in run order, Sequentials opened (running them one by one is running the Sequential)."""
    for m in modules:
        if type(m) is nn.Sequential:
            yield from _leaves(m)
        else:
            yield m


class TorchvisionModel(Classifier):
    """A torchvision classifier with the zoo's interface; its children (and state_dict keys) are torchvision's."""

    def __init__(self, net: nn.Module, *, arch: str, num_classes: int, in_channels: int) -> None:
        super().__init__(arch=arch, num_classes=num_classes, in_channels=in_channels)
        self.family = FAMILIES[type(net).__name__]
        for name, child in net.named_children():
            self.add_module(name, child)
        self.stages = self.family.stages(self)

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        feats = []
        for stage in self.stages:
            for path in stage:
                x = self.get_submodule(path)(x)
            feats.append(x)
        return feats

    def head_layers(self) -> Head:
        """The family's pooling, flatten and classifier, under the model's own names."""
        return self.family.head(self)

    def get_head(self) -> ClassifierHead:
        """A new head module sharing this model's parameters (not a child of the model)."""
        return ClassifierHead(self.head_layers())

    def forward(self, x: Tensor, is_feat: bool = False) -> Tensor | tuple[list[Tensor], Tensor]:
        feats = self.feature_maps(x)
        out, pooled = feats[-1], None
        for layer in _leaves(self.head_layers().values()):
            out = layer(out)
            if pooled is None and out.dim() == 2:
                pooled = out
        if is_feat:
            return [*feats, pooled], out
        return out


def _first_conv(model: nn.Module) -> str:
    """Path of the input conv: the first Conv2d the model registers (the stem's, in every family here)."""
    return next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))


def _replace_first_conv(model: TorchvisionModel, in_channels: int) -> None:
    """Swap the input conv for one taking ``in_channels`` (same place in the state_dict, family init)."""
    path = _first_conv(model)
    old: nn.Conv2d = model.get_submodule(path)
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation, old.groups,
                    bias=old.bias is not None, padding_mode=old.padding_mode)
    model.family.init_conv(new)
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def build(name: str, *, num_classes: int, in_channels: int = 3) -> TorchvisionModel:
    """torchvision model ``name`` (one of :data:`NAMES`) with random weights, wrapped; arch ``tv:NAME``."""
    if name not in NAMES:
        raise CamkdError(f"unknown torchvision model {name!r}; choose one of: {', '.join(NAMES)}")
    import torchvision.models

    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    model = TorchvisionModel(net, arch=f"tv:{name}", num_classes=num_classes, in_channels=in_channels)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


for _name in NAMES:
    MODELS.add(f"tv:{_name}", functools.partial(build, _name))

__all__ = ["FAMILIES", "NAMES", "Family", "SpatialMean", "TorchvisionModel", "build"]
