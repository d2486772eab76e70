"""ShuffleNet V1 for CIFAR, registered as ``ShuffleV1`` (groups 3, widths 240/480/960).

Mirrors ``models/ShuffleNetv1.py`` of HobbitLong/RepDistiller (CA-MKD uses the same
model): parameter names and shapes match.  Features: ``[f0, f1, f2, f3, pooled]``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camkd.models.cifar import CifarModel, global_pool
from camkd.models.registry import register_model


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """[N, g*c, H, W] -> interleave the g groups' channels."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; stride 2 concatenates an avg-pooled input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        # The first block sees the 24-channel stem and uses an ungrouped first conv.
        self.first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, 3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNet(CifarModel):
    """1x1 stem to 24 channels, then three stages whose first block halves the resolution."""

    def __init__(
        self,
        out_planes: Sequence[int],
        num_blocks: Sequence[int],
        groups: int,
        *,
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.layer1 = self._make_layer(24, out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[0], out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[1], out_planes[2], num_blocks[2], groups)
        self.avgpool = global_pool()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(out_planes[2], num_classes)

    @staticmethod
    def _make_layer(in_planes: int, out_planes: int, blocks: int, groups: int) -> nn.Sequential:
        # The stride-2 block's output is concatenated with its input, so it makes fewer channels.
        layers = [Bottleneck(in_planes, out_planes - in_planes, stride=2, groups=groups)]
        layers += [Bottleneck(out_planes, out_planes, 1, groups) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f0, f1, f2, f3]

    def head_layers(self) -> OrderedDict[str, nn.Module]:
        return OrderedDict(avgpool=self.avgpool, flatten=self.flatten, linear=self.linear)


@register_model
def ShuffleV1(*, num_classes: int, in_channels: int = 3) -> ShuffleNet:
    return ShuffleNet((240, 480, 960), (4, 8, 4), 3, num_classes=num_classes, in_channels=in_channels)
