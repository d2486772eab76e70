"""CIFAR VGGs with batch norm (vgg8, vgg11, vgg13, vgg16, vgg19).

Mirrors ``models/vgg.py`` of HobbitLong/RepDistiller (``vgg*_bn``, registered as
``vgg*`` like RepDistiller's and CA-MKD's model_dict): five conv blocks, one Linear.
Features: ``[f0, f1, f2, f3, f4, pooled]`` (each block's ReLU output).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from camkd.models.cifar import CifarModel, global_pool, init_weights
from camkd.models.registry import register_model

_CFG: dict[str, tuple[tuple[int, ...], ...]] = {
    "S": ((64,), (128,), (256,), (512,), (512,)),
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "D": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "E": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _make_block(widths: Sequence[int], in_channels: int) -> nn.Sequential:
    """[conv3x3(bias), BN, ReLU] per width, without the final ReLU (applied in forward)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(CifarModel):
    """VGG with max-pooling between blocks 0-3 and global average pooling before the Linear."""

    def __init__(
        self, cfg: Sequence[Sequence[int]], *, num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels)
        self.block0 = _make_block(cfg[0], in_channels)
        self.block1 = _make_block(cfg[1], cfg[0][-1])
        self.block2 = _make_block(cfg[2], cfg[1][-1])
        self.block3 = _make_block(cfg[3], cfg[2][-1])
        self.block4 = _make_block(cfg[4], cfg[3][-1])
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = global_pool()
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        init_weights(self, linear="normal")

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        height = x.shape[2]
        f0 = F.relu(self.block0(x))
        f1 = F.relu(self.block1(self.pool(f0)))
        f2 = F.relu(self.block2(self.pool(f1)))
        f3 = F.relu(self.block3(self.pool(f2)))
        f4 = F.relu(self.block4(self.pool(f3) if height == 64 else f3))
        return [f0, f1, f2, f3, f4]

    def head_layers(self) -> OrderedDict[str, nn.Module]:
        return OrderedDict(pool4=self.pool4, flatten=self.flatten, classifier=self.classifier)


@register_model
def vgg8(*, num_classes: int, in_channels: int = 3) -> VGG:
    return VGG(_CFG["S"], num_classes=num_classes, in_channels=in_channels)


@register_model
def vgg11(*, num_classes: int, in_channels: int = 3) -> VGG:
    return VGG(_CFG["A"], num_classes=num_classes, in_channels=in_channels)


@register_model
def vgg13(*, num_classes: int, in_channels: int = 3) -> VGG:
    return VGG(_CFG["B"], num_classes=num_classes, in_channels=in_channels)


@register_model
def vgg16(*, num_classes: int, in_channels: int = 3) -> VGG:
    return VGG(_CFG["D"], num_classes=num_classes, in_channels=in_channels)


@register_model
def vgg19(*, num_classes: int, in_channels: int = 3) -> VGG:
    return VGG(_CFG["E"], num_classes=num_classes, in_channels=in_channels)
