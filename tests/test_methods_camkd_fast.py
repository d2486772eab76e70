"""CA-MKD's feature term, computed the cheap way (1x1 conv before the upsample, resize as a matmul,
per-sample MSE as sum/n), equals a straightforward implementation of the formula to float32 round-off:
the loss, its weights, the gradients of the student map and of every Embed parameter, and the BN running stats."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camkd.config import LossConfig
from camkd.methods import StudentOut, TeacherOut, create_method


def straightforward_inter(method, f_s, f_t, heads, labels):
    """Resize the student map to each teacher's size (pool down / bilinear up), Embed, head, CE, MSE."""
    h, w = f_s.shape[-2:]
    ces, mses = [], []
    for k, emb in enumerate(method.embeds):
        size = tuple(f_t[k].shape[-2:])
        if (h, w) == size:
            x = f_s
        elif h >= size[0] and w >= size[1]:
            x = F.adaptive_avg_pool2d(f_s, size)
        else:
            x = F.interpolate(f_s, size=size, mode="bilinear", align_corners=False)
        e = emb.relu(emb.bn(emb.conv(x)))
        ces.append(F.cross_entropy(heads[k](e), labels, reduction="none"))
        mses.append((e - f_t[k]).pow(2).flatten(1).mean(1))
    ce, mse = torch.stack(ces, 1), torch.stack(mses, 1)
    K = ce.shape[1]
    v = (1 - torch.softmax(ce, 1)) / (K - 1) if K > 1 else torch.ones_like(ce)
    return (v * mse).sum() / mse.numel(), v


CASES = {
    "vgg8_from_resnet32x4": ((16, 4, 4), [(12, 8, 8)] * 3),  # the benchmark's shapes, scaled down
    "mixed": ((6, 4, 4), [(5, 2, 2), (4, 4, 4), (7, 8, 8), (3, 6, 6), (4, 3, 7)]),  # down, same, 2x, 1.5x, mixed
    "one_teacher_up": ((5, 3, 3), [(4, 8, 8)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_feature_term_equals_straightforward(case):
    s_shape, t_shapes = CASES[case]
    B, C, K = 8, 10, len(t_shapes)
    torch.manual_seed(0)
    method = create_method(
        "camkd",
        num_classes=C,
        num_teachers=K,
        student_feat_shapes=[s_shape, (s_shape[0],)],
        teacher_feat_shapes={"penultimate": t_shapes},
        loss=LossConfig(beta=1.0),
    ).train()
    for emb in method.embeds:  # non-trivial BN affine parameters
        nn.init.normal_(emb.bn.weight, 1.0, 0.3)
        nn.init.normal_(emb.bn.bias, 0.0, 0.3)
    ref = copy.deepcopy(method)
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(s[0], C)).requires_grad_(False) for s in t_shapes]
    f_t = [torch.randn(B, *s) for s in t_shapes]
    labels = torch.randint(0, C, (B,))
    f_s = torch.randn(B, *s_shape) * 2

    x1 = f_s.clone().requires_grad_(True)
    losses, diags = method(
        StudentOut(logits=torch.randn(B, C), feats=[x1, x1.mean((2, 3))]),
        TeacherOut(logits=torch.randn(B, K, C), features={"penultimate": f_t}, heads=heads),
        labels,
        epoch=2,
    )
    x2 = f_s.clone().requires_grad_(True)
    expected, v = straightforward_inter(ref, x2, f_t, heads, labels)

    assert torch.allclose(losses["inter"], expected, rtol=2e-6, atol=0)
    assert torch.allclose(diags["inter_weights"], v.detach().mean(0), rtol=2e-6, atol=1e-7)
    losses["inter"].backward()
    expected.backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-4, atol=1e-6 * x2.grad.abs().max().item())
    # the conv biases' true gradient is 0 (BN removes them): compare at the scale of all gradients
    scale = max(q.grad.abs().max().item() for q in ref.parameters())
    for (name, p), q in zip(method.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6 * scale), name
    for (name, b), c in zip(method.named_buffers(), ref.buffers(), strict=True):
        assert torch.allclose(b.double(), c.double(), rtol=1e-5, atol=1e-6), name
