"""ShuffleNet V2 for CIFAR, registered as ``ShuffleV2`` (net size 1: 116/232/464, 1024).

Mirrors ``models/ShuffleNetv2.py`` of Rorozhl/CA-MKD (RepDistiller's, with ``f3`` taken
after the final 1x1 conv-BN-ReLU): parameter names and shapes match.  Features:
``[f0, f1, f2, f3, pooled]``; the head is pooling and ``linear``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camkd.models.cifar import CifarModel, global_pool
from camkd.models.registry import register_model
from camkd.models.shufflenetv1 import channel_shuffle


class BasicBlock(nn.Module):
    """Split channels in half; transform the second half (1x1, dw 3x3, 1x1); concat; shuffle."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.split = in_channels // 2
        c = in_channels - self.split
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class DownBlock(nn.Module):
    """Stride-2 block: two branches (dw-3x3, 1x1) and (1x1, dw-3x3, 1x1), concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(CifarModel):
    """1x1 stem to 24 channels, three stages (DownBlock + BasicBlocks), 1x1 conv to ``out[3]``."""

    def __init__(
        self,
        out_channels: Sequence[int],
        num_blocks: Sequence[int],
        *,
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels)
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.layer1 = self._make_layer(24, out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[0], out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[1], out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = global_pool()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(out_channels[3], num_classes)

    @staticmethod
    def _make_layer(in_channels: int, out_channels: int, blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(blocks)]
        return nn.Sequential(*layers)

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = F.relu(self.bn2(self.conv2(self.layer3(f2))))
        return [f0, f1, f2, f3]

    def head_layers(self) -> OrderedDict[str, nn.Module]:
        return OrderedDict(avgpool=self.avgpool, flatten=self.flatten, linear=self.linear)


@register_model
def ShuffleV2(*, num_classes: int, in_channels: int = 3) -> ShuffleNetV2:
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes=num_classes, in_channels=in_channels)
