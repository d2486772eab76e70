"""What every model in the zoo is, whatever builds it: a :class:`Classifier`.

The CIFAR zoo (:class:`camkd.models.cifar.CifarModel`), torchvision's models (``tv:NAME``,
:class:`camkd.models.tv.TorchvisionModel`) and timm's (``timm:NAME``, :class:`camkd.models.timm_models.TimmModel`)
all subclass it, and the rest of camkd (teachers, methods, the store, fit) relies on nothing else:

- ``arch``, ``num_classes``, ``in_channels``: the registered name it was built under, and its sizes;
- ``model(x)`` gives logits; ``model(x, is_feat=True)`` gives ``(feats, logits)``: ``feats`` are feature maps, in
  order (the reference positions for the CIFAR zoo, stage outputs otherwise; FitNet's hints index them), then the
  pooled, flattened vector, so ``feats[-2]`` is the map the head reads;
- ``model.get_head()`` is a new module (not a child of the model) sharing the model's parameters, with
  ``get_head()(feats[-2]) == logits``; its ``state_dict()`` keys are the model's own keys for those layers, so a
  head's weights load into a fresh head of the same arch.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


class Classifier(nn.Module):
    """Base class of every zoo model: subclasses implement :meth:`forward` and :meth:`get_head` (the contract above)."""

    arch: str

    def __init__(self, *, arch: str, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.in_channels = in_channels

    def get_head(self) -> nn.Module:
        """A new module mapping ``feats[-2]`` to the logits, sharing this model's parameters (not a child of it)."""
        raise NotImplementedError

    def forward(self, x: Tensor, is_feat: bool = False) -> Tensor | tuple[list[Tensor], Tensor]:
        """Logits, or ``(feats, logits)`` with ``is_feat``."""
        raise NotImplementedError


class ClassifierHead(nn.Sequential):
    """A head built from a model's own modules (the CIFAR zoo's and torchvision's).

    It holds references (not copies) to the model's layers, so it shares their
    parameters; its ``state_dict()`` keys are the model's own keys for those layers
    (e.g. ``fc.weight``), so a head's weights load into a fresh head of the same arch.
    """

    def __init__(self, layers: OrderedDict[str, nn.Module]) -> None:
        super().__init__(layers)


__all__ = ["Classifier", "ClassifierHead"]
