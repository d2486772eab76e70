"""timm's models behind the zoo's interface, registered as the prefix family ``timm:NAME`` (any ``timm.list_models()`` name).

timm is an optional extra (``pip install 'camkd[timm]'``), imported only when a ``timm:`` name is looked
up: importing camkd.models does not import it. :func:`build` calls ``timm.create_model(name,
pretrained=False, ...)`` (nothing is ever downloaded) and wraps the model in :class:`TimmModel`, whose
parameters, buffers and children are the timm model's own (the same dicts), so its ``state_dict`` keys are
timm's and a timm state_dict loads strictly.

- ``feats``: timm's ``forward_intermediates`` maps (one per stage, so FitNet's hints index real stages)
  where the model has it, then the ``forward_features`` map, then the pooled vector
  (``forward_head(pre_logits=True)``); without ``forward_intermediates``: the last map and the pooled vector;
- ``get_head()`` runs timm's ``forward_head`` and holds the children it uses (found once by running it on a
  1 x 1 map), sharing the model's parameters; where that probe does not fit (a ViT's token maps) it holds them all.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import Tensor, nn

from camkd.errors import CamkdError
from camkd.models.registry import MODELS, CifarModel
from camkd.registry import Prefix

PREFIX = "timm:"


def _timm(name: str) -> ModuleType:
    """The timm package; without it, the one-line error saying how to install it."""
    try:
        import timm
    except ImportError:
        raise CamkdError(f"{PREFIX}{name} needs timm: pip install 'camkd[timm]'") from None
    return timm


def resolve(name: str) -> str:
    """timm's spelling of ``name`` (its names are lower case); a name timm does not have is a one-line error."""
    if name.lower() not in _timm(name).list_models():
        raise CamkdError(f"unknown arch '{PREFIX}{name}': timm has no model {name!r} (timm.list_models() lists its names)")
    return name.lower()


def _share_state(module: nn.Module, net: nn.Module) -> None:
    """Make ``module``'s parameters, buffers and children ``net``'s own dicts: the same state_dict, moved together."""
    module._parameters = net._parameters
    module._buffers = net._buffers
    module._non_persistent_buffers_set = net._non_persistent_buffers_set
    module._modules = net._modules


def _record(called: set[str], child: str, *_: object) -> None:
    """Forward pre-hook: note that a module under ``child`` ran."""
    called.add(child)


def _head_children(net: nn.Module) -> list[str] | None:
    """Names of the children timm's ``forward_head`` runs, or None where a 1 x 1 map does not fit it or misses the classifier.

    The probe runs in eval mode (no batch statistics updated) with no grad; timm gives no list of the head's modules.
    """
    called: set[str] = set()
    hooks = [m.register_forward_pre_hook(functools.partial(_record, called, name.split(".")[0]))
             for name, m in net.named_modules() if name]
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval().forward_head(torch.zeros(1, net.num_features, 1, 1))
    except RuntimeError:
        return None
    finally:
        net.train(was_training)
        for hook in hooks:
            hook.remove()
    classifier = next(name.split(".")[0] for name, m in net.named_modules() if m is net.get_classifier())
    return [name for name, _ in net.named_children() if name in called] if classifier in called else None


class TimmHead(nn.Module):
    """timm's ``forward_head`` (last map -> logits) as a module sharing the model's head children and their keys."""

    def __init__(self, net: nn.Module, children: list[str] | None) -> None:
        super().__init__()
        self.__dict__["net"] = net  # not a child: its keys would repeat the model's under "net."
        if children is None:
            _share_state(self, net)
        for name in children or []:
            self.add_module(name, net.get_submodule(name))

    def forward(self, x: Tensor) -> Tensor:
        self.net.training = self.training  # the root's flag (its dropout); the children follow train()/eval() themselves
        return self.net.forward_head(x)


class TimmModel(CifarModel):
    """A timm classifier with the zoo's interface; its parameters, buffers and children (state_dict keys) are timm's."""

    def __init__(self, net: nn.Module, *, arch: str, num_classes: int, in_channels: int) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels)
        self.arch = arch
        self.__dict__["net"] = net  # not a child: the state below is its own, under timm's keys
        _share_state(self, net)
        self.head_children = _head_children(net)

    def get_head(self) -> TimmHead:
        return TimmHead(self.net, self.head_children)

    def forward(self, x: Tensor, is_feat: bool = False) -> Tensor | tuple[list[Tensor], Tensor]:
        net = self.net
        net.training = self.training
        if not is_feat:
            return net.forward_head(net.forward_features(x))
        if hasattr(net, "forward_intermediates"):
            last, maps = net.forward_intermediates(x)
            maps = maps[:-1] if maps and maps[-1] is last else maps  # the last stage's map is often the final one
        else:
            last, maps = net.forward_features(x), []
        return [*maps, last, net.forward_head(last, pre_logits=True)], net.forward_head(last)


def build(name: str, *, num_classes: int, in_channels: int = 3) -> TimmModel:
    """timm model ``name`` (a ``timm.list_models()`` name) with random weights, wrapped; arch ``timm:NAME``."""
    name = resolve(name)
    net = _timm(name).create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    return TimmModel(net, arch=f"{PREFIX}{name}", num_classes=num_classes, in_channels=in_channels)


MODELS.add_prefix(PREFIX, Prefix(resolve=resolve, entry=lambda name: functools.partial(build, name),
                                 shown=f"{PREFIX}NAME (any timm model; pip install 'camkd[timm]')"))

__all__ = ["PREFIX", "TimmHead", "TimmModel", "build", "resolve"]
