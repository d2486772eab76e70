"""Pieces every training loop shares: schedule, seeded epoch order, evaluation, metrics file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from camkd.datasets import Dataset
from camkd.errors import CamkdError
from camkd.views import hash_counter, normalize

SMALL_LR_ARCHS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def default_lr(arch: str) -> float:
    """The reference's learning rate: 0.01 for MobileNetV2/ShuffleV1/ShuffleV2, 0.05 otherwise."""
    return 0.01 if arch.lower() in {a.lower() for a in SMALL_LR_ARCHS} else 0.05


def lr_at(epoch: int, base_lr: float, decay_epochs: Sequence[int], rate: float = 0.1) -> float:
    """Step schedule of the reference: epoch (1-based) e uses base * rate ** #{d : e > d}."""
    return base_lr * rate ** int(sum(epoch > d for d in decay_epochs))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_sgd(params, *, lr: float, momentum: float, weight_decay: float, nesterov: bool) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled sample order of ``epoch``: a pure function of (seed, epoch), on CPU."""
    g = torch.Generator().manual_seed(int(hash_counter(seed, epoch, np.zeros(1, dtype=np.int64), 7)[0] >> np.uint64(1)))
    return torch.randperm(n, generator=g)


def check_batch_size(batch_size: int, n: int, *, drop_last: bool) -> None:
    """An epoch must have at least one trainable batch."""
    if n < 2 or (drop_last and batch_size > n):
        raise CamkdError(f"--batch-size {batch_size} is larger than the {n} training samples, so no step would run; "
                         "lower --batch-size" + ("" if n >= 2 else " or raise --limit"))


def batches(order: torch.Tensor, batch_size: int, *, drop_last: bool) -> Iterator[torch.Tensor]:
    """Index slices of ``order``; a trailing batch of one is always dropped (BatchNorm cannot train on it)."""
    n = len(order)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) > 1:
            yield idx


@torch.inference_mode()
def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 512, amp: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean CE loss on un-augmented images."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    dev = data.images.device
    for start in range(0, len(data), batch_size):
        x = normalize(data.images[start : start + batch_size], data.norm)
        y = data.labels[start : start + batch_size]
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda"):
            logits = model(x).float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
    model.train(was_training)
    n = max(len(data), 1)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n}


class MetricsFile:
    """JSON lines, one per epoch; on resume, lines past the checkpoint's epoch are dropped."""

    def __init__(self, path: Path, *, resume_epoch: int | None) -> None:
        self.path = path
        if resume_epoch is None:
            path.write_text("")
        elif path.exists():
            keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("epoch", 0) <= resume_epoch]
            path.write_text("".join(l + "\n" for l in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
