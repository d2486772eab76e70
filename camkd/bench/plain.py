"""A plain PyTorch training loop: the yardstick `bench speed` measures camkd's `ce` (the student alone) against.

Nothing of camkd's loop: no teacher source, no loss sums or finiteness checks, no seeded views. The same
student (create_model), the same uint8 training set on the device, padded once; per step a random
permutation's slice, random crop offsets and flips drawn on the device (torch's generator), one gather,
normalization, forward, cross-entropy, backward and an SGD step with the run's hyper-parameters, under the
same precision and memory format. The device is synchronized once, at the end of each epoch (by reading the
last loss), as camkd reads its sums once per epoch. fp16 steps through torch's GradScaler with the plain
(unfused) SGD, as a plain loop is written: the scaler then reads its overflow flag on the host at every step.
Nothing here comes from camkd's own precision code (camkd/precision.py), so the yardstick stays independent.

With a method (``method``, ``teachers``): the same loop plus the method's own work, the limit of a method with trainable
parts of its own (camkd+features: its Embeds and the teachers' stored heads; fitnet: its ConvRegs). Its teacher outputs
are whole views read once, before timing, from the store the cached runs read, held on the device in float32
(:func:`teacher_views`); per step the student's forward gives its features, the batch's rows are indexed out of the
views, and the method's forward (its loss terms, summed) is trained with the student by one SGD. camkd's training loop
(fit, the teacher sources) takes no part: the difference between a cached run and this limit is the cache's cost.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from camkd.config import LossConfig, OptimConfig
from camkd.data.inmemory import Dataset
from camkd.data.order import view_of_epoch
from camkd.errors import CamkdError
from camkd.methods import Method, StudentOut, TeacherOut, create_method, required_layers, resolve_loss
from camkd.models import create_model
from camkd.store.reader import TeacherStore
from camkd.teachers import stored_heads

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


def store_method(name: str, loss: LossConfig, arch: str, train: Dataset, store: TeacherStore) -> Method:
    """Method ``name`` built as distill builds it for student ``arch`` on ``store`` (its feature layers' shapes), on
    ``train``'s device: fresh trainable parts, for one run of the loop."""
    loss = resolve_loss(name, loss)
    device = train.images.device
    model = create_model(arch, num_classes=train.num_classes, in_channels=train.in_channels).to(device).eval()
    with torch.no_grad():
        feats, _ = model(torch.zeros((2, *train.images.shape[1:]), device=device), is_feat=True)
    return create_method(name, num_classes=train.num_classes, num_teachers=store.num_teachers,
                         student_feat_shapes=[tuple(f.shape[1:]) for f in feats],
                         teacher_feat_shapes={layer: store.feature_shapes(layer) for layer in required_layers(name, loss)},
                         loss=loss).to(device)


def own_parts(method: Method, epoch: int = 2) -> bool:
    """Whether ``method`` trains parts of its own in ``epoch`` (the timed one): its limit is then the plain loop with them."""
    return bool(method.trained_parameters(epoch))


def teacher_views(store: TeacherStore, layers: tuple[str, ...], device: torch.device) -> list[TeacherOut]:
    """Every view of a dense ``store`` whole on ``device`` (one read per array, the store's API): logits and ``layers``'
    features in float32, and the teachers' stored heads (one set, shared by the views)."""
    if store.logits_spec.kind != "dense":
        raise CamkdError(f"plain loop with a method's parts: {store.path} keeps top-k logits; give a dense store")
    heads = stored_heads(store, device)
    return [TeacherOut(logits=store.logits(v, device).float(),
                       features={layer: [torch.from_numpy(a).to(device).float() for a in store.features(layer, v)]
                                 for layer in layers}, heads=heads)
            for v in range(store.views)]


def _rows(t: TeacherOut, idx: torch.Tensor) -> TeacherOut:
    return TeacherOut(logits=t.logits[idx], features={k: [f[idx] for f in v] for k, v in t.features.items()}, heads=t.heads)


def plain_images_per_s(arch: str, train: Dataset, *, batch_size: int, optim: OptimConfig, precision: str = "fp32",
                       channels_last: bool = False, seed: int = 0, epochs: int = 2, method: Method | None = None,
                       teachers: list[TeacherOut] | None = None) -> list[float]:
    """Train ``arch`` on ``train`` (uint8 images on their device) for ``epochs`` full epochs (drop-last batches);
    returns each epoch's training images/s (the caller takes epoch 2's, as for camkd's loop).

    With ``method`` (built by :func:`store_method`) and ``teachers`` (:func:`teacher_views`; epoch e reads view
    (e - 1) mod V, as distill does): the loss is the method's terms on the student's outputs and the batch's rows of
    the teachers' outputs, and the method's parameters train with the student's."""
    check_precision(precision)
    device = train.images.device
    n = len(train)
    if batch_size > n:
        raise CamkdError(f"plain loop: batch {batch_size} is larger than the {n} samples")
    if (method is None) != (teachers is None):
        raise CamkdError("plain loop: a method needs its teacher outputs (teachers=), and they need the method")
    if teachers is not None and teachers[0].logits.shape[0] != n:
        raise CamkdError(f"plain loop: the teacher outputs hold {teachers[0].logits.shape[0]} samples, the data {n}")
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=train.num_classes, in_channels=train.in_channels).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    params = list(model.parameters())
    if method is not None:
        method.train()
        params += list(method.parameters())
    lr = optim.lr if optim.lr is not None else 0.05
    opt = torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
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
    for epoch in range(1, epochs + 1):
        view = teachers[view_of_epoch(epoch, len(teachers))] if teachers is not None else None
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
                if view is None:
                    loss = F.cross_entropy(model(x).float(), labels[idx])
                else:  # the method's own work: its terms on the batch's rows of the teachers' outputs, held in memory
                    feats, logits = model(x, is_feat=True)
                    losses, _ = method(StudentOut(logits=logits.float(), feats=feats), _rows(view, idx), labels[idx],
                                       epoch=epoch)
                    loss = sum(losses.values())
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
