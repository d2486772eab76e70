"""Top-1 / top-5 accuracy of a model on un-augmented images (teachers, students, checkpoints)."""

from __future__ import annotations

import torch
from torch import nn

from camkd import dist
from camkd.data import Dataset
from camkd.data.views import normalize


@torch.inference_mode()
def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 256, amp: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean CE loss on un-augmented images.

    Counts accumulate on the device and are read once at the end (no per-batch host sync). Under
    torchrun each rank passes its own slice of the split and the counts are summed over ranks.
    """
    was_training = model.training
    model.eval()
    dev = data.images.device
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # top-1 hits, top-5 hits, CE sum, images
    for start in range(0, len(data), batch_size):
        x = normalize(data.images[start : start + batch_size], data.norm)
        y = data.labels[start : start + batch_size]
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda"):
            logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += (top[:, 0] == y).sum()
        sums[1] += (top == y[:, None]).any(dim=1).sum()
        sums[2] += nn.functional.cross_entropy(logits, y, reduction="sum").double()
    sums[3] = len(data)
    model.train(was_training)
    top1, top5, loss, n = dist.all_sum(sums).tolist()
    n = max(n, 1)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n}
