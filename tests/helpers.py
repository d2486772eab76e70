"""Helpers several test files share (imported as ``from helpers import ...``; pytest puts tests/ on the path)."""

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn


def kill_while_writing(start: Callable[[int], tuple[subprocess.Popen, Path]], flags: Callable[[Path], np.ndarray | None],
                       *, attempts: int) -> tuple[int, Path, np.ndarray]:
    """kill -9 a cache-teachers process once some but not all of its blocks are flagged; ``start(attempt)`` starts one
    (returning it and its store). Returns (attempt, store, flags after the kill); fails the test if no try lands."""
    for attempt in range(attempts):
        proc, store = start(attempt)
        while proc.poll() is None:
            now = flags(store)
            if now is not None and 0 < now.sum() < now.size:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait()
        after = flags(store)
        if proc.returncode == -signal.SIGKILL and after is not None and 0 < after.sum() < after.size:
            return attempt, store, after
    pytest.fail("could not kill cache-teachers while it was writing")


def randomize_buffers(model: nn.Module) -> None:
    """BN running statistics away from their defaults, so loading and eval-mode forwards depend on them."""
    with torch.no_grad():
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)


def assert_loads_strictly(model: nn.Module, reference: nn.Module, path: Path) -> None:
    """``reference``'s state_dict saved at ``path`` loads strictly into ``model`` (same keys, same order), and both
    give the same logits (torch.equal) in eval mode."""
    torch.save(reference.state_dict(), path)
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference.eval()(x))


def two_teachers(root: Path, n: int, *, device: str | None = None) -> list[str]:
    """resnet8 and wrn_16_1 (seeds 0 and 1) trained one epoch on ``n`` synthetic samples, batch 32, under ``root``
    (on ``device``; the default device when None); their best.pth paths."""
    from configs import train_cfg

    from camkd.train import train_teacher

    on = {} if device is None else {"device": device}
    paths = []
    for seed, arch in enumerate(("resnet8", "wrn_16_1")):
        out = root / arch
        train_teacher(train_cfg(arch=arch, dataset="synthetic", synthetic_samples=n, epochs=1, batch_size=32, seed=seed,
                                out=str(out), progress=False, **on))
        paths.append(str(out / "best.pth"))
    return paths
