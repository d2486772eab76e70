"""MobileNetV2 for CIFAR, registered as ``MobileNetV2`` (expansion T=6, width 0.5).

Mirrors RepDistiller's ``mobile_half`` (``models/mobilenetv2.py``), which CA-MKD registers
as ``MobileNetV2``; parameter names and shapes match.  Features:
``[f0, f1, f2, f3, f4, pooled]``; ``f4`` is the output of the last inverted-residual
stage, *before* ``conv2``, so the head is conv2 (1x1 conv-BN-ReLU), pooling, classifier.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from camkd.models.cifar import CifarModel, global_pool, init_weights
from camkd.models.registry import register_model

# (expansion, channels, repeats, first stride); expansion None means "use T".
_SETTING: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Pointwise expand, depthwise 3x3, linear pointwise project; residual when shapes allow.

    The expand conv is present even for expansion 1, as in the reference (keys ``conv.0..7``).
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class CifarMobileNetV2(CifarModel):
    """MobileNetV2 with expansion ``t`` and width multiplier ``width`` (last channel 1280)."""

    def __init__(
        self, t: int, width: float, *, num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels)
        channels = int(32 * width)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for expansion, c, repeats, first_stride in _SETTING:
            out_channels = int(c * width)
            stage = []
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                stage.append(InvertedResidual(channels, out_channels, stride, expansion or t))
                channels = out_channels
            self.blocks.append(nn.Sequential(*stage))
        last_channel = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last_channel, 1, 1)
        self.avgpool = global_pool()
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(last_channel, num_classes))
        init_weights(self, linear="normal")

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        f0 = self.conv1(x)
        f1 = self.blocks[1](self.blocks[0](f0))
        f2 = self.blocks[2](f1)
        f3 = self.blocks[4](self.blocks[3](f2))
        f4 = self.blocks[6](self.blocks[5](f3))
        return [f0, f1, f2, f3, f4]

    def head_layers(self) -> OrderedDict[str, nn.Module]:
        return OrderedDict(
            conv2=self.conv2, avgpool=self.avgpool, flatten=self.flatten, classifier=self.classifier
        )


@register_model
def MobileNetV2(*, num_classes: int, in_channels: int = 3) -> CifarMobileNetV2:
    return CifarMobileNetV2(6, 0.5, num_classes=num_classes, in_channels=in_channels)
