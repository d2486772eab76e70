"""Whether one batch can be held in the free memory, checked before any image or activation is allocated.

A run whose first batch cannot be allocated (``--image-size 100000``, or a batch far too large for the machine) fails
deep inside a decoder or a convolution with the allocator's traceback. :func:`check_batch_memory` refuses it first,
in one line that names the estimate, the free memory and the option to lower.

The estimate is cheap and allocates nothing: the models run once on PyTorch's ``meta`` device (shapes only) on an
input at the run's image size, and forward hooks add up the bytes of what their layers output. It is deliberately a
lower bound, so that no run that fits is refused:

- the images: the uint8 batch and its float32 copy;
- a model being trained: every layer's output of one image (what autograd keeps for the backward pass; an in-place
  layer's output is counted once), times the batch; weights, gradients, optimizer state and the backward pass's own
  buffers are left out;
- a model run for inference only (teachers): the largest input + output of one layer, times the batch;
- half the activation bytes under ``--precision bf16|fp16``.

Free memory: on CUDA the driver's free bytes plus what PyTorch's allocator holds unused; on the CPU the kernel's
``MemAvailable`` (``/proc/meminfo``), else the free physical pages; unknown (no check) elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from camkd.data import DataSplit
from camkd.device import free_memory
from camkd.errors import CamkdError
from camkd.models import create_model
from camkd.words import human, plural

HALF = ("bf16", "fp16")
FLOAT_BYTES = 4  # the normalized input, and activations, in float32
AT_MOST_PER_VALUE = 100_000
"""Bytes per input value (image side^2 x channels) beyond any model's estimate here (resnet32x4 about 3,300, tv:resnet18
130): a batch that fits even at this rate is passed without running a model, so small runs pay nothing."""


def activation_bytes(model: nn.Module, in_channels: int, size: int) -> tuple[int, int] | None:
    """Per image of ``size`` px: (the bytes of every layer's output, the largest input + output of one layer), from
    one forward on the meta device (nothing allocated; the model's own weights untouched). None when the model does
    not run on the meta device."""
    total, peak = 0, 0

    def hook(module, inputs, output):
        nonlocal total, peak
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        outs = [t for t in (output if isinstance(output, (tuple, list)) else [output]) if isinstance(t, torch.Tensor)]
        out = sum(t.numel() * t.element_size() for t in outs if t is not first)  # an in-place layer: counted once
        total += out
        peak = max(peak, out + (first.numel() * first.element_size() if first is not None else 0))

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    meta = {name: torch.empty_like(t, device="meta") for name, t in [*model.named_parameters(), *model.named_buffers()]}
    was_training = model.training
    try:
        model.eval()  # the shapes of train mode; eval keeps BatchNorm from refusing a tiny batch
        with torch.no_grad():
            torch.func.functional_call(model, meta, (torch.empty(2, in_channels, size, size, device="meta"),))
    except Exception:  # noqa: BLE001 - an op without a meta kernel: no estimate, the run goes on unchecked
        return None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total // 2, peak // 2


def _meta_model(arch: str, data: DataSplit) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return create_model(arch, num_classes=data.num_classes, in_channels=data.in_channels)
    except Exception:  # noqa: BLE001 - a constructor that cannot run on meta: no estimate for it
        return None


def check_batch_memory(device: torch.device, data: DataSplit, batch: int, *, train: Sequence[str] = (),
                       infer: Sequence[nn.Module] = (), precision: str = "fp32", size_option: str = "--image-size",
                       batch_option: str = "--batch-size") -> None:
    """Refuse (one CamkdError) a batch of ``batch`` images of ``data`` that clearly cannot be held on ``device``:
    the students ``train`` (arch names, trained) and the ``infer`` models (run without gradients) together.

    ``size_option``: what the user lowers to get smaller images (a store's size: another store); the message names
    it when even a batch of 2 does not fit, else ``batch_option`` with the largest batch that does."""
    free = free_memory(device)
    if free is None:
        return
    n = min(batch, len(data))
    c, s = data.in_channels, data.image_size
    if n * c * s * s * AT_MOST_PER_VALUE * max(1, len(train) + len(infer)) <= free[0]:
        return
    pixels = c * s * s * (1 + FLOAT_BYTES)
    scale = 0.5 if precision in HALF else 1.0
    parts: dict[str, int] = {"pixels": pixels}
    for arch in train:
        model = _meta_model(arch, data)
        got = activation_bytes(model, c, s) if model is not None else None
        if got is not None:
            parts[f"{arch}'s activations for training"] = int(got[0] * scale)
    teacher = [got[1] for m in infer if (got := activation_bytes(m, c, s)) is not None]
    if teacher:
        parts["the teachers' largest layer"] = int(max(teacher) * scale)
    per_image = sum(parts.values())
    need = per_image * n
    if need <= free[0]:
        return
    fits = free[0] // per_image
    what = ", ".join(f"{k} {human(v * n)}" for k, v in parts.items())
    if fits >= 2:
        lower = f"lower {batch_option} (a batch of about {fits} fits)"
    else:
        side = max(1, math.isqrt(int(s * s * free[0] / (2 * per_image))))  # the estimate grows with the area
        lower = f"lower {size_option} (about {side} px fits a batch of 2)"
    raise CamkdError(f"one batch of {plural(n, 'image')} at {s} px needs at least {human(need)} ({what}), more than the "
                     f"{human(free[0])} of {free[1]}; {lower}")
