"""A plain PyTorch training loop: the yardstick `bench speed` measures camkd's `ce` (the student alone) against.

Nothing of camkd's loop: no teacher source, no loss sums or finiteness checks, no seeded views. The same
student (create_model), the same uint8 training set on the device, padded once; per step a random
permutation's slice, random crop offsets and flips drawn on the device (torch's generator), one gather,
normalization, forward, cross-entropy, backward and an SGD step with the run's hyper-parameters, under the
same precision and memory format. The device is synchronized once, at the end of each epoch (by reading the
last loss), as camkd reads its sums once per epoch. fp16 steps through torch's GradScaler with the plain
(unfused) SGD, as a plain loop is written: the scaler then reads its overflow flag on the host at every step.
Nothing here comes from camkd's own precision code (camkd/precision.py), so the yardstick stays independent.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from camkd.config import OptimConfig
from camkd.data.inmemory import Dataset
from camkd.errors import CamkdError
from camkd.models import create_model

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision -> autocast dtype
PADDING = 4  # the 32-px recipe's RandomCrop(32, padding=4)


def check_precision(precision: str) -> None:
    if precision not in AUTOCAST:
        raise CamkdError(f"unknown --precision {precision!r}; choose {', '.join(AUTOCAST)}")


def autocast(device: torch.device, precision: str):
    """torch.autocast at ``precision`` (fp32: no autocast)."""
    check_precision(precision)
    dtype = AUTOCAST[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def plain_images_per_s(arch: str, train: Dataset, *, batch_size: int, optim: OptimConfig, precision: str = "fp32",
                       channels_last: bool = False, seed: int = 0, epochs: int = 2) -> list[float]:
    """Train ``arch`` on ``train`` (uint8 images on their device) for ``epochs`` full epochs (drop-last batches);
    returns each epoch's training images/s (the caller takes epoch 2's, as for camkd's loop)."""
    check_precision(precision)
    device = train.images.device
    n = len(train)
    if batch_size > n:
        raise CamkdError(f"plain loop: batch {batch_size} is larger than the {n} samples")
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=train.num_classes, in_channels=train.in_channels).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    lr = optim.lr if optim.lr is not None else 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                          nesterov=optim.nesterov)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    gen = torch.Generator(device=device).manual_seed(seed)
    padded = F.pad(train.images, (PADDING,) * 4)  # zeros, once
    labels = train.labels.to(device)
    _, c, h, w = train.images.shape
    mean = torch.tensor(train.norm.mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(train.norm.std, device=device).view(1, -1, 1, 1) * 255
    ar_h, ar_w = torch.arange(h, device=device), torch.arange(w, device=device)
    ci = torch.arange(c, device=device).view(1, c, 1, 1)
    steps = n // batch_size
    rates = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n, device=device, generator=gen)
        loss = None
        for s in range(steps):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            off = torch.randint(0, 2 * PADDING + 1, (batch_size, 2), device=device, generator=gen)
            flip = torch.randint(0, 2, (batch_size, 1), device=device, generator=gen).bool()
            rows = (off[:, 1:2] + ar_h).view(batch_size, 1, h, 1)
            cols = (off[:, 0:1] + torch.where(flip, (w - 1) - ar_w, ar_w)).view(batch_size, 1, 1, w)
            x = (padded[idx.view(-1, 1, 1, 1), ci, rows, cols].float() - mean) / std
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                loss = F.cross_entropy(model(x).float(), labels[idx])
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:  # fp16: a gradient scaler, as autocast to float16 needs
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        if loss is not None:
            float(loss.detach())  # waits for the device
        rates.append(steps * batch_size / (time.perf_counter() - t0))
    return rates
