"""In-memory training views copy nothing from the host per step (issue 24): an epoch's rows and their view parameters
are computed once on the host, copied to the device once, and each step takes slices of those copies.

A CPU has no host->device copy to count, so the count is taken on the ``meta`` device (a device whose tensors hold
no data: every copy from the CPU to it is an operator a dispatch mode sees); the structure (one tensor per epoch,
each step's batch a view of it) and the views' bit-for-bit equality with the per-step path are checked on the CPU."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from camkd.data import load_dataset
from camkd.data.norm import normalize
from camkd.data.views import EpochParams, EpochRows, apply_params, augment, view_params
from camkd.epoch_plan import EpochPlan

META = torch.device("meta")


class HostCopies(TorchDispatchMode):
    """Counts the operators that take a CPU tensor of more than one element and return a tensor on another device."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sources = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor) and a.device.type == "cpu"
                   and a.numel() > 1]
        if sources and isinstance(out, torch.Tensor) and out.device.type != "cpu":
            self.copies.append((str(func), tuple(sources[0].shape)))
        return out


def plan_rows(n: int, *, rank: int = 0, ranks: int = 1) -> EpochRows:
    plan = EpochPlan.of(n, seed=5, epoch=3, views=4, batch_size=16, drop_last=False, slices=ranks)
    return plan.rank_rows(rank, ranks)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", "train", num_samples=100)


def test_an_epoch_is_copied_to_the_device_once_not_per_step(data):
    """Before, every step copied its parameters (apply_params) and its indices (view_batches) from the host: two
    copies per step. Now the epoch's indices and parameters are copied once each, and not again when the loop has
    already copied the indices (fit does, for the labels and the teachers)."""
    on_meta = data.to(META)
    spec = data.aug_spec(3)
    rows = plan_rows(len(data))
    assert len(rows) == 7  # enough steps that per-step copies would show
    with HostCopies() as mode:  # index batches as any caller gives them (the store's writer: a list of arrays)
        got = list(on_meta.view_batches(spec, 2, [np.array(b) for b in rows], META))
    assert len(got) == len(rows) and all(x.device == META for x, _, _ in got)
    assert sorted(shape for _, shape in mode.copies) == [(len(rows.indices),), (len(rows.indices), 3)], mode.copies

    rows = plan_rows(len(data))
    on = rows.on(META)  # as fit does: the indices copied once, before the views are asked for
    assert rows.on(META) is on
    with HostCopies() as mode:
        got = list(on_meta.view_batches(spec, 2, rows, META))
    assert len(got) == len(rows)
    assert [shape for _, shape in mode.copies] == [(len(rows.indices), 3)], mode.copies  # only the parameters


def test_each_step_is_a_slice_of_the_epoch_copies(data):
    spec = data.aug_spec(3)
    rows = plan_rows(len(data), rank=1, ranks=2)
    on = rows.on(torch.device("cpu"))
    params = EpochParams.of(spec, 2, rows, torch.device("cpu"))
    assert params.on_device.dtype == torch.int64 and params.host.dtype == torch.int16
    assert params.host.shape == (len(rows.indices), 3) and torch.equal(params.host, view_params(spec, 2, rows.indices))
    dev_ptr = params.on_device.untyped_storage().data_ptr()
    for k, idx in enumerate(rows):
        s = rows.rows(k)
        assert idx.base is rows.indices  # the host rows: a numpy view of the epoch's one array
        assert on[s].untyped_storage().data_ptr() == on.untyped_storage().data_ptr()
        assert params.on_device[s].untyped_storage().data_ptr() == dev_ptr
    # what view_batches yields per step: the host parameters are slices of one epoch tensor (what check_view reads)
    got = list(data.view_batches(spec, 2, rows, torch.device("cpu")))
    assert len(got) == len(rows) > 1
    assert len({p.untyped_storage().data_ptr() for _, p, _ in got}) == 1 and all(p._base is not None for _, p, _ in got)
    assert torch.equal(torch.cat([p for _, p, _ in got]), params.host)


def test_epoch_views_equal_the_per_step_path_bit_for_bit(data):
    spec = data.aug_spec(7)
    for rank, ranks in ((0, 1), (0, 2), (1, 2)):
        rows = plan_rows(len(data), rank=rank, ranks=ranks)
        got = list(data.view_batches(spec, 1, rows, torch.device("cpu")))
        assert len(got) == len(rows)
        for idx, (images, params, hashes) in zip(rows, got, strict=True):
            ref = view_params(spec, 1, idx)  # the per-step path: this batch's own parameters and gather
            assert hashes is None and torch.equal(params, ref)
            assert torch.equal(images, apply_params(data.images[torch.from_numpy(idx)], ref, spec.padding))
            x, ref_params = augment(data.images, idx.copy(), spec, view=1)
            assert torch.equal(ref_params, params) and torch.equal(normalize(images, spec.norm), x)


def test_epoch_rows_are_the_plans_rank_batches():
    plan = EpochPlan.of(50, seed=3, epoch=2, views=3, batch_size=8, drop_last=False, slices=2)
    for rank in (0, 1):
        rows = plan.rank_rows(rank, 2)
        want = plan.rank_batches(rank, 2)
        assert len(rows) == len(want) and all(np.array_equal(a, b) for a, b in zip(rows, want, strict=True))
        assert np.array_equal(rows.indices, np.concatenate(want)) and rows.indices.dtype == np.int64
    assert EpochRows.of(rows) is rows
    empty = EpochRows([])
    assert len(empty) == 0 and list(empty) == [] and empty.indices.dtype == np.int64
    with pytest.raises(IndexError):
        rows[len(rows)]


@pytest.mark.cuda  # skipped without a CUDA device (tests/conftest.py)
def test_cuda_epoch_views_never_synchronize(data):
    """On CUDA the copies are from pinned memory without blocking, and no step synchronizes (sync debug mode
    raises on a blocking copy or a synchronization); the views equal the CPU's bit for bit."""
    spec = data.aug_spec(3)
    dev = torch.device("cuda", torch.cuda.current_device())
    on_gpu = data.to(dev)
    rows = plan_rows(len(data))
    cpu = list(data.view_batches(spec, 2, rows, torch.device("cpu")))
    rows = plan_rows(len(data))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows.on(dev)
        got = list(on_gpu.view_batches(spec, 2, rows, dev))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(got) == len(cpu)
    for (a, pa, _), (b, pb, _) in zip(cpu, got, strict=True):
        assert pb.device.type == "cpu" and torch.equal(pa, pb) and torch.equal(a, b.cpu())
