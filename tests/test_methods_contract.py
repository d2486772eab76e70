"""The method contract: diagnostics are detached device tensors and a step never reads a tensor on the host."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from camkd.config import LossConfig
from camkd.methods import StudentOut, TeacherOut, create_method, list_methods, required_layers
from camkd.methods.base import LogitMethod

K, C, B = 3, 7, 4
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__")


def build(name: str):
    s_shapes = [(6, 8, 8), (8, 4, 4), (8,)]
    t_shapes = {"penultimate": [(5, 2, 2), (4, 4, 4), (6, 8, 8)], "hint1": [(5, 4, 4), (4, 2, 2), (6, 8, 8)]}
    method = create_method(
        name,
        num_classes=C,
        num_teachers=K,
        student_feat_shapes=s_shapes,
        teacher_feat_shapes=t_shapes,
        loss=LossConfig(hint_layer=1),
    ).train()
    torch.manual_seed(0)
    feats = [torch.randn(B, *s, requires_grad=True) for s in s_shapes]
    logits = torch.randn(B, C, requires_grad=True)
    layers = {n: [torch.randn(B, *s) for s in t_shapes[n]] for n in required_layers(name, LossConfig(hint_layer=1))}
    heads = [
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(s[0], C)).requires_grad_(False)
        for s in t_shapes["penultimate"]
    ]
    teachers = TeacherOut(logits=torch.randn(B, K, C) * 3, features=layers, heads=heads)
    return method, StudentOut(logits=logits, feats=feats), teachers, torch.randint(0, C, (B,))


@pytest.fixture
def no_host_reads(monkeypatch):
    """Any host read of a tensor (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, numpy ...) raises."""

    def refuse(name):
        def f(*args, **kwargs):
            raise AssertionError(f"host read Tensor.{name} on the step path")

        return f

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


@pytest.mark.parametrize("epoch", [1, 2])
@pytest.mark.parametrize("name", ["aekd", "avg", "camkd", "ce", "ebkd", "fitnet", "kd"])
def test_step_has_no_host_reads(name, epoch, no_host_reads):
    method, student, teachers, labels = build(name)
    losses, diags = method(student, teachers, labels, epoch=epoch)
    sum(losses.values()).backward()  # the backward pass too


@pytest.mark.parametrize("name", ["aekd", "avg", "camkd", "ce", "ebkd", "fitnet", "kd"])
def test_diagnostics_contract(name):
    method, student, teachers, labels = build(name)
    losses, diags = method(student, teachers, labels, epoch=2)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in losses.values())
    if name == "ce":
        assert diags == {}
        return
    expected = {"teacher_weights", "inter_weights"} if name == "camkd" else {"teacher_weights"}
    assert set(diags) == expected
    for v in diags.values():
        assert isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.shape == (K,)
        assert v.device == student.logits.device and not v.requires_grad and v.grad_fn is None
        assert (v >= 0).all() and abs(v.double().sum().item() - 1.0) < 1e-6


def test_logit_methods_share_one_forward():
    """Every teacher method is a LogitMethod with the base's forward (no copies of it)."""
    for name in list_methods():
        cls = type(build(name)[0])
        if name == "ce":
            assert not issubclass(cls, LogitMethod)
            continue
        assert issubclass(cls, LogitMethod) and cls.forward is LogitMethod.forward
