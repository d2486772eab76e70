"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4).

Mirrors ``models/resnet.py`` of HobbitLong/RepDistiller (as used by Rorozhl/CA-MKD):
parameter names and shapes match, so their checkpoints load with ``strict=True``.
Features: ``[f0, f1, f2, f3, pooled]`` (stem, then each of the three stages).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from camkd.models.cifar import CifarModel, global_pool, init_weights
from camkd.models.registry import register_model


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1-conv shortcut, ReLU after the sum."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class ResNet(CifarModel):
    """3-stage CIFAR ResNet of depth 6n+2 with BasicBlocks; ``filters`` = (stem, stage1..3)."""

    def __init__(
        self, depth: int, filters: Sequence[int], *, num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels)
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.layer1 = self._make_layer(filters[0], filters[1], n, stride=1)
        self.layer2 = self._make_layer(filters[1], filters[2], n, stride=2)
        self.layer3 = self._make_layer(filters[2], filters[3], n, stride=2)
        self.avgpool = global_pool()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(filters[3], num_classes)
        init_weights(self, linear="default")

    @staticmethod
    def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(inplanes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f0, f1, f2, f3]

    def head_layers(self) -> OrderedDict[str, nn.Module]:
        return OrderedDict(avgpool=self.avgpool, flatten=self.flatten, fc=self.fc)


_BASE = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


@register_model
def resnet8(*, num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(8, _BASE, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet14(*, num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(14, _BASE, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet20(*, num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(20, _BASE, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet32(*, num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(32, _BASE, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet44(*, num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(44, _BASE, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet56(*, num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(56, _BASE, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet110(*, num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(110, _BASE, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet8x4(*, num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(8, _X4, num_classes=num_classes, in_channels=in_channels)


@register_model
def resnet32x4(*, num_classes: int, in_channels: int = 3) -> ResNet:
    return ResNet(32, _X4, num_classes=num_classes, in_channels=in_channels)
