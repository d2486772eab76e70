"""Wide ResNets for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Mirrors ``models/wrn.py`` of Rorozhl/CA-MKD (itself RepDistiller's): parameter names
and shapes match.  Features: ``[f0, f1, f2, f3, pooled]`` where, as in CA-MKD, ``f3``
is taken after the final BN+ReLU, so the head is only pooling and ``fc``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from camkd.models.cifar import CifarModel, global_pool, init_weights
from camkd.models.registry import register_model


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus (projected) shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A stage of ``n`` blocks; only the first changes width and stride (keys ``layer.<i>``)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
              for i in range(n))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(CifarModel):
    """WRN-depth-k: depth 6n+4, stage widths 16k, 32k, 64k."""

    def __init__(
        self, depth: int, widen_factor: int, *, num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels)
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], stride=1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], stride=2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.avgpool = global_pool()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self, linear="zero_bias")

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = F.relu(self.bn1(self.block3(f2)))
        return [f0, f1, f2, f3]

    def head_layers(self) -> OrderedDict[str, nn.Module]:
        return OrderedDict(avgpool=self.avgpool, flatten=self.flatten, fc=self.fc)


@register_model
def wrn_16_1(*, num_classes: int, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 1, num_classes=num_classes, in_channels=in_channels)


@register_model
def wrn_16_2(*, num_classes: int, in_channels: int = 3) -> WideResNet:
    return WideResNet(16, 2, num_classes=num_classes, in_channels=in_channels)


@register_model
def wrn_40_1(*, num_classes: int, in_channels: int = 3) -> WideResNet:
    return WideResNet(40, 1, num_classes=num_classes, in_channels=in_channels)


@register_model
def wrn_40_2(*, num_classes: int, in_channels: int = 3) -> WideResNet:
    return WideResNet(40, 2, num_classes=num_classes, in_channels=in_channels)
