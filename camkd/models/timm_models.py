"""timm's models behind the zoo's interface, registered as the prefix family ``timm:NAME`` (any ``timm.list_models()`` name).

timm is an optional extra (``pip install 'camkd[timm]'``), imported only when a ``timm:`` name is looked
up: importing camkd.models does not import it. :func:`build` calls ``timm.create_model(name,
pretrained=False, ...)`` (nothing is ever downloaded) and wraps the model in :class:`TimmModel`, which registers
the timm model's own parameters, buffers and children (the same objects, under the same names, in the same order)
as its own, so its ``state_dict`` keys are timm's and a timm state_dict loads strictly. timm's code runs on the timm
model (``forward_features``, ``forward_head``, ...), whose root is pointed at the wrapper's state first (:func:`_lend`).

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
from camkd.models.base import Classifier
from camkd.models.registry import MODELS
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


def _adopt(module: nn.Module, source: nn.Module, children: list[str] | None = None) -> None:
    """Register ``source``'s own parameters, buffers (persistent or not) and children on ``module``: the same objects
    under the same names, in ``source``'s order, so ``module``'s state_dict keys and order are ``source``'s and
    ``.to()``, ``train()`` and ``load_state_dict`` reach the modules timm runs. ``children``: only those children
    (and no parameters or buffers of ``source``'s own)."""
    if children is None:
        persistent = set(source.state_dict(keep_vars=True))
        for name, param in source.named_parameters(recurse=False, remove_duplicate=False):
            module.register_parameter(name, param)
        for name, buf in source.named_buffers(recurse=False, remove_duplicate=False):
            module.register_buffer(name, buf, persistent=name in persistent)
        children = [name for name, _ in source.named_modules(remove_duplicate=False) if name and "." not in name]
    for name in children:
        module.add_module(name, source.get_submodule(name))


def _lend(module: nn.Module, net: nn.Module) -> None:
    """Point timm's root module ``net`` at ``module``'s training flag, parameters and buffers before timm's code runs.

    ``module`` holds the very objects ``net`` holds (:func:`_adopt`), but torch replaces a module's own tensors on
    ``module`` alone: ``.to()`` makes new buffer tensors, ``load_state_dict(assign=True)`` new parameters,
    ``torch.func.functional_call`` (the memory estimate) plain tensors for one call. Such a name is assigned on ``net``
    again; otherwise nothing is. (Children are never replaced by torch: they stay the same objects.)
    """
    net.training = module.training  # the root's flag (its dropout); the children follow train()/eval() themselves
    for name, value in [*module.named_parameters(recurse=False, remove_duplicate=False),
                        *module.named_buffers(recurse=False, remove_duplicate=False)]:
        if getattr(net, name, None) is value:
            continue
        if not isinstance(value, nn.Parameter) and name in dict(net.named_parameters(recurse=False)):
            delattr(net, name)  # a plain tensor in a parameter's place (functional_call): net holds it as an attribute
        setattr(net, name, value)


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
    """timm's ``forward_head`` (last map -> logits) as a module holding the model's head children under their keys
    (all of the model's state where the children are not known)."""

    def __init__(self, model: TimmModel) -> None:
        super().__init__()
        self.__dict__["net"] = model.net  # not a child: its keys would repeat the model's under "net."
        _adopt(self, model, model.head_children)

    def forward(self, x: Tensor) -> Tensor:
        _lend(self, self.net)
        return self.net.forward_head(x)


class TimmModel(Classifier):
    """A timm classifier with the zoo's interface; its parameters, buffers and children (state_dict keys) are timm's."""

    def __init__(self, net: nn.Module, *, arch: str, num_classes: int, in_channels: int) -> None:
        super().__init__(arch=arch, num_classes=num_classes, in_channels=in_channels)
        self.__dict__["net"] = net  # not a child: its state is registered below as the wrapper's own, under timm's keys
        _adopt(self, net)
        self.head_children = _head_children(net)

    def get_head(self) -> TimmHead:
        """A new head module sharing this model's parameters (not a child of the model)."""
        return TimmHead(self)

    def forward(self, x: Tensor, is_feat: bool = False) -> Tensor | tuple[list[Tensor], Tensor]:
        net = self.net
        _lend(self, net)
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
