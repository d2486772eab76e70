"""The methods' feature-map resizes (camkd/methods/resize.py) equal the torch ops they replace
(``adaptive_avg_pool2d``, bilinear ``F.interpolate``), forward and backward, in float32 (to float32
rounding) and float64 (to float64 rounding), for dividing and non-dividing sizes, up and down; the
methods' feature terms keep no op whose CUDA backward ``--deterministic`` refuses; under --compile the
whole Embed / ConvReg path (resize included) is the module's compiled call."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camkd.config import LossConfig
from camkd.methods import StudentOut, TeacherOut, create_method
from camkd.methods.resize import Resize, resize_weights, separable
from camkd.precision import Precision
from camkd.trainee import compile_trainable_parts

POOL = [  # (src, size): dividing, non-dividing, one axis divides, to 1x1, the same size
    ((8, 8), (4, 4)), ((7, 5), (3, 2)), ((6, 9), (4, 9)), ((5, 6), (1, 1)), ((12, 8), (4, 3)), ((4, 4), (4, 4)),
]
BILINEAR = [  # up by whole factors, up by fractions, down, mixed (one axis down), one axis the same, from 1 px
    ((4, 4), (8, 8)), ((3, 5), (7, 6)), ((8, 8), (3, 5)), ((4, 4), (3, 7)), ((4, 4), (4, 9)), ((1, 4), (5, 3)),
]
CASES = [(s, z, "pool", False) for s, z in POOL] + [(s, z, "bilinear", ac) for s, z in BILINEAR for ac in (False, True)]
IDS = [f"{m}-{s[0]}x{s[1]}-{z[0]}x{z[1]}" + ("-ac" if ac else "") for s, z, m, ac in CASES]


def torch_op(x, size, mode, align_corners):
    if mode == "pool":
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def forward_backward(fn, x, g):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    (dx,) = torch.autograd.grad((y * g).sum(), x)
    return y.detach(), dx


def close(a, b, dtype) -> bool:
    """Equal to a few units of ``dtype``'s rounding at the values' scale."""
    return a.shape == b.shape and bool(((a - b).abs() <= 16 * torch.finfo(dtype).eps * b.abs().max().clamp_min(1)).all())


@pytest.mark.parametrize(("src", "size", "mode", "align_corners"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_the_torch_op(src, size, mode, align_corners, dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, *src, dtype=dtype) * 3
    g = torch.randn(3, 5, *size, dtype=dtype)
    r = Resize(src, size, mode, align_corners=align_corners)
    if dtype == torch.float64 and r.matrices:  # the module keeps float32 weights; the exact ones come from resize_weights
        wh, ww = resize_weights(src, size, mode, align_corners=align_corners)
        ours = forward_backward(lambda t: separable(t, wh, ww), x, g)
    else:
        ours = forward_backward(r.to(dtype), x, g)
    ref = forward_backward(lambda t: torch_op(t, size, mode, align_corners), x, g)
    assert close(ours[0], ref[0], dtype), (ours[0] - ref[0]).abs().max()
    assert close(ours[1], ref[1], dtype), (ours[1] - ref[1]).abs().max()
    if mode == "bilinear" and src != (1, 4):  # the comparison can fail: the other align_corners is another map
        other = forward_backward(lambda t: torch_op(t, size, mode, not align_corners), x, g)
        assert not close(ours[0], other[0], dtype)


def test_which_formulation():
    """Whole-factor pooling is avg_pool2d (kernel = stride); any other pool or bilinear resize, two matmuls with
    float32 weights that are not state (no checkpoint key); the same size, identity. Pooling up is refused."""
    assert Resize((8, 8), (4, 4), "pool").kernel == (2, 2) and not Resize((8, 8), (4, 4), "pool").matrices
    assert Resize((12, 8), (4, 1), "pool").kernel == (3, 8)
    for r in (Resize((7, 5), (3, 2), "pool"), Resize((4, 4), (8, 8), "bilinear")):
        assert r.kernel is None and r.matrices and r.wh.dtype == torch.float32 and r.state_dict() == {}
    same = Resize((4, 4), (4, 4), "bilinear")
    x = torch.randn(2, 3, 4, 4)
    assert same(x) is x and list(same.buffers()) == []
    with pytest.raises(ValueError, match="cannot average-pool"):
        Resize((4, 8), (5, 4), "pool")


def test_weights_rows_sum_to_one():
    """Each output is a weighted mean of inputs (what lets CA-MKD's 1x1 conv, bias included, run before a bilinear
    upsample): every row of every weight matrix sums to 1, in float64 to rounding."""
    for src, size, mode, ac in CASES:
        for w in resize_weights(src, size, mode, align_corners=ac):
            assert torch.allclose(w.sum(1), torch.ones(w.shape[0], dtype=torch.float64), rtol=0, atol=1e-15)
            assert (w >= 0).all()


# ------------------------------------------------------------------ the methods' feature terms
NONDETERMINISTIC_CUDA_BACKWARD = ("AdaptiveAvgPool2DBackward", "UpsampleBilinear2D", "UpsampleLinear1D", "Upsample")


def backward_nodes(t: torch.Tensor) -> set[str]:
    names, seen, todo = set(), set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(f.name())
        todo.extend(n for n, _ in f.next_functions)
    return names


def refused(names: set[str]) -> set[str]:
    return {n for n in names if any(n.startswith(p) for p in NONDETERMINISTIC_CUDA_BACKWARD)}


CAMKD_SHAPES = {  # student map -> teacher maps (down by 2, non-dividing down, same, up 2x, up 1.5x, mixed)
    "down_same_up": ((6, 4, 4), [(5, 2, 2), (4, 3, 3), (4, 4, 4), (7, 8, 8), (3, 6, 6), (4, 3, 7)]),
    "vgg8_from_resnet32x4": ((16, 4, 4), [(12, 8, 8)] * 3),
}
FITNET_SHAPES = ((6, 3, 5), [(4, 8, 8), (5, 7, 4), (3, 12, 20)])  # every teacher taller: bilinear, then a 3x3 conv


def camkd_inputs(s_shape, t_shapes, B=6, C=10, seed=0):
    torch.manual_seed(seed)
    method = create_method("camkd", num_classes=C, num_teachers=len(t_shapes), student_feat_shapes=[s_shape, (s_shape[0],)],
                           teacher_feat_shapes={"penultimate": t_shapes}, loss=LossConfig(beta=1.0)).train()
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(s[0], C)).requires_grad_(False) for s in t_shapes]
    tout = TeacherOut(logits=torch.randn(B, len(t_shapes), C), features={"penultimate": [torch.randn(B, *s) for s in t_shapes]},
                      heads=heads)
    f_s = (torch.randn(B, *s_shape) * 2).requires_grad_(True)
    return method, StudentOut(logits=torch.randn(B, C), feats=[f_s, f_s.mean((2, 3))]), tout, torch.randint(0, C, (B,))


def fitnet_inputs(B=6, C=10, seed=0):
    s_shape, t_shapes = FITNET_SHAPES
    torch.manual_seed(seed)
    method = create_method("fitnet", num_classes=C, num_teachers=len(t_shapes), student_feat_shapes=[s_shape, (s_shape[0],)],
                           teacher_feat_shapes={"hint0": t_shapes}, loss=LossConfig(beta=1.0, hint_layer=0)).train()
    tout = TeacherOut(logits=torch.randn(B, len(t_shapes), C), features={"hint0": [torch.randn(B, *s) for s in t_shapes]})
    f_s = (torch.randn(B, *s_shape) * 2).requires_grad_(True)
    return method, StudentOut(logits=torch.randn(B, C), feats=[f_s, f_s.mean((2, 3))]), tout, torch.randint(0, C, (B,))


@pytest.mark.parametrize("case", sorted(CAMKD_SHAPES))
def test_camkd_feature_term_has_a_deterministic_backward(case):
    """No node of the loss's backward graph is one torch.use_deterministic_algorithms refuses on CUDA (the list in its
    docstring: AdaptiveAvgPool2d, interpolate's linear modes); the torch ops this replaced do put such nodes there."""
    method, student, tout, y = camkd_inputs(*CAMKD_SHAPES[case])
    losses, _ = method(student, tout, y, epoch=2)
    assert refused(backward_nodes(losses["inter"])) == set()
    f_s = student.feats[0]
    old = [torch_op(f_s, tuple(f.shape[-2:]), "pool" if f.shape[-1] <= 4 and f.shape[-2] <= 4 else "bilinear", False)
           for f in tout.features["penultimate"]]
    assert refused(set().union(*(backward_nodes(t) for t in old)))  # the check sees them


def test_fitnet_hint_term_has_a_deterministic_backward():
    method, student, tout, y = fitnet_inputs()
    losses, _ = method(student, tout, y, epoch=2)
    assert refused(backward_nodes(losses["hint"])) == set()
    assert refused(backward_nodes(torch_op(student.feats[0], (8, 8), "bilinear", False)))


def test_fitnet_hint_equals_interpolate_then_conv():
    """FitNet's loss as before this resize (``F.interpolate(bilinear, align_corners=False)``, conv, BN, ReLU, MSE): the
    same value, student-map gradient and regressor gradients to float32 rounding."""
    method, student, tout, y = fitnet_inputs()
    for reg in method.regressors:  # non-trivial BN affine parameters
        nn.init.normal_(reg.bn.weight, 1.0, 0.3)
        nn.init.normal_(reg.bn.bias, 0.0, 0.3)
    ref = copy.deepcopy(method)
    losses, _ = method(student, tout, y, epoch=2)
    x2 = student.feats[0].detach().clone().requires_grad_(True)
    terms = []
    for reg, f in zip(ref.regressors, tout.features["hint0"], strict=True):
        r = reg.relu(reg.bn(reg.conv(F.interpolate(x2, size=tuple(f.shape[-2:]), mode="bilinear", align_corners=False))))
        terms.append(F.mse_loss(r, f))
    expected = torch.stack(terms).mean()
    assert torch.allclose(losses["hint"], expected, rtol=2e-6, atol=0)
    losses["hint"].backward()
    expected.backward()
    g1, g2 = student.feats[0].grad, x2.grad
    assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-6 * g2.abs().max().item())
    scale = max(q.grad.abs().max().item() for q in ref.parameters())
    for (name, p), q in zip(method.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6 * scale), name


# ------------------------------------------------------------------ --compile
def compiled_parts(method) -> list[nn.Module]:
    return list(method.embeds) if hasattr(method, "embeds") else list(method.regressors)


@pytest.mark.parametrize("name", ["camkd", "fitnet"])
def test_the_compiled_call_is_the_whole_path(name):
    """What the loop runs for each Embed / ConvReg is the module's call, input the student's map and output the
    teacher's size (so the resize is inside it), and that call is what --compile compiles
    (``nn.Module.compile``: ``__call__`` runs the compiled ``_compiled_call_impl``). Inductor is not run here."""
    method, student, tout, y = camkd_inputs(*CAMKD_SHAPES["down_same_up"]) if name == "camkd" else fitnet_inputs()
    layer = "penultimate" if name == "camkd" else "hint0"
    parts = compiled_parts(method)
    calls: list[tuple[int, tuple, tuple]] = []
    for k, part in enumerate(parts):
        part.register_forward_hook(lambda m, args, out, k=k: calls.append((k, tuple(args[0].shape), tuple(out.shape))))
    method(student, tout, y, epoch=2)
    s = tuple(student.feats[0].shape)
    assert calls == [(k, s, tuple(f.shape)) for k, f in enumerate(tout.features[layer])]
    compile_trainable_parts(method, Precision(compile=True))
    assert all(p._compiled_call_impl is not None for p in parts)


@pytest.mark.slow
def test_compiled_camkd_equals_eager():
    """Inductor on the CPU (a C++ compiler needed): CA-MKD's feature term with compiled Embeds (pooled, same-size and
    upsampled ones) equals eager's to float32 rounding, value and gradients, and dynamo captured one graph per Embed."""
    import shutil

    if not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        pytest.skip("inductor needs a C++ compiler")
    s_shape, t_shapes = (6, 4, 4), [(5, 2, 2), (4, 4, 4), (7, 8, 8)]
    method, student, tout, y = camkd_inputs(s_shape, t_shapes)
    eager = copy.deepcopy(method)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_trainable_parts(method, Precision(compile=True))
    a, _ = method(student, tout, y, epoch=2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= len(t_shapes)
    x2 = student.feats[0].detach().clone().requires_grad_(True)
    b, _ = eager(StudentOut(logits=student.logits, feats=[x2, x2.mean((2, 3))]), tout, y, epoch=2)
    assert torch.allclose(a["inter"], b["inter"], rtol=1e-5, atol=0)
    a["inter"].backward()
    b["inter"].backward()
    assert torch.allclose(student.feats[0].grad, x2.grad, rtol=1e-4, atol=1e-6 * x2.grad.abs().max().item())
    scale = max(q.grad.abs().max().item() for q in eager.parameters())  # the conv biases' true gradient is 0 (BN)
    for (n, p), q in zip(method.named_parameters(), eager.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6 * scale), n


# ------------------------------------------------------------------ CUDA (skipped without a device)
def feature_term_grads(name: str, device: str) -> list[torch.Tensor]:
    """The feature term (camkd: pooled, same-size and upsampled Embeds; fitnet: bilinear ConvRegs) on ``device``: its
    value, the student map's gradient and the method's parameters' gradients, on the CPU (inputs made there, seeded)."""
    method, student, tout, y = camkd_inputs(*CAMKD_SHAPES["down_same_up"]) if name == "camkd" else fitnet_inputs()
    method = method.to(device)
    f_s = student.feats[0].detach().to(device).requires_grad_(True)
    student = StudentOut(logits=student.logits.to(device), feats=[f_s, f_s.mean((2, 3))])
    tout = TeacherOut(logits=tout.logits.to(device), features={k: [f.to(device) for f in v] for k, v in tout.features.items()},
                      heads=[h.to(device) for h in tout.heads])
    losses, _ = method(student, tout, y.to(device), epoch=2)
    loss = losses["inter" if name == "camkd" else "hint"]
    loss.backward()
    return [loss.detach().cpu(), f_s.grad.cpu(), *(p.grad.cpu() for p in method.parameters())]


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["camkd", "fitnet"])
def test_deterministic_backward_on_cuda(name, monkeypatch):
    """Under torch.use_deterministic_algorithms (what --deterministic sets, camkd.device.set_deterministic) the feature
    term's backward runs on CUDA (bilinear interpolate's, the op it replaced, raises there), twice bit for bit the same,
    and equal to the CPU's to float32 rounding (TF32 off)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, as set_deterministic sets it
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = True, False, False, False
    try:
        x = torch.randn(2, 3, 4, 4, device="cuda", requires_grad=True)
        with pytest.raises(RuntimeError, match="deterministic"):
            F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False).sum().backward()
        first, second = feature_term_grads(name, "cuda"), feature_term_grads(name, "cuda")
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = old[2:]
    cpu = feature_term_grads(name, "cpu")
    assert len(first) == len(second) == len(cpu)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    scale = max(c.abs().max().item() for c in cpu[2:])  # parameters' gradients (the conv biases' true one is 0: BN)
    assert torch.allclose(first[0], cpu[0], rtol=1e-5, atol=0)
    assert torch.allclose(first[1], cpu[1], rtol=1e-4, atol=1e-6 * cpu[1].abs().max().item())
    for a, c in zip(first[2:], cpu[2:], strict=True):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-6 * scale)
