"""The invariant's foundation: view parameters are a pure function of (seed, view, index)."""

import numpy as np
import pytest
import torch

from camkd.data import counter, load_dataset
from camkd.data.augspec import AugSpec
from camkd.data.norm import normalize
from camkd.data.views import apply_params, augment, view_params


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", "train", num_samples=300)


def spec_for(data, seed=0):
    return AugSpec(seed=seed, norm=data.norm)


def test_same_image_whatever_the_batching(data):
    spec = spec_for(data)
    whole, _ = augment(data.images, torch.arange(len(data)), spec, view=3)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
    parts = [augment(data.images, chunk, spec, view=3)[0] for chunk in perm.split(37)]
    shuffled = torch.cat(parts)
    assert torch.equal(shuffled, whole[perm])  # bit-identical, not just close


def test_params_independent_of_order_and_batch():
    spec = AugSpec(seed=5, norm=load_dataset("synthetic", "test", num_samples=4).norm)
    idx = np.arange(1000)
    full = view_params(spec, 2, idx)
    rev = view_params(spec, 2, idx[::-1].copy())
    assert torch.equal(full, rev.flip(0))
    assert torch.equal(view_params(spec, 2, np.array([777])), full[777:778])


def test_views_and_seeds_differ(data):
    idx = np.arange(2000)
    a = view_params(spec_for(data, 0), 0, idx)
    assert (a != view_params(spec_for(data, 0), 1, idx)).any(dim=1).float().mean() > 0.8
    assert (a != view_params(spec_for(data, 1), 0, idx)).any(dim=1).float().mean() > 0.8


def test_param_distribution_follows_recipe(data):
    p = view_params(spec_for(data), 0, np.arange(20000))
    for col in (0, 1):
        counts = torch.bincount(p[:, col].long(), minlength=9)
        assert len(counts) == 9 and (counts > 20000 / 9 * 0.9).all(), counts  # offsets 0..8, about uniform
    assert abs(p[:, 2].float().mean().item() - 0.5) < 0.02
    assert set(p[:, 2].tolist()) == {0, 1}


def test_apply_params_is_crop_then_flip():
    img = torch.arange(2 * 3 * 6 * 6, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 6, 6)
    params = torch.tensor([[0, 8, 0], [5, 2, 1]], dtype=torch.int16)
    out = apply_params(img, params, padding=4)
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
    expect0 = padded[0, :, 8:14, 0:6]
    expect1 = padded[1, :, 2:8, 5:11].flip(-1)
    assert torch.equal(out[0], expect0) and torch.equal(out[1], expect1)
    assert out[0, :, -2:, :].eq(0).all()  # dy = 8 shows the zero padding at the bottom


def test_normalize_matches_totensor_normalize(data):
    x = normalize(data.images[:4], data.norm)
    mean = torch.tensor(data.norm.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.norm.std).view(1, -1, 1, 1)
    assert torch.equal(x, (data.images[:4].float() / 255 - mean) / std)


def _every_byte() -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()


def test_normalize_divides_truly():
    """x / 255 is IEEE float32 division of every byte value (numpy's), not x * (1 / 255) (126 of 256 values differ)."""
    from camkd.data.norm import Normalization

    x = normalize(_every_byte(), Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    true = np.arange(256, dtype=np.float32) / np.float32(255)
    assert np.array_equal(x[0, 0].flatten().numpy(), true)
    assert not np.array_equal(true, np.arange(256, dtype=np.float32) * (np.float32(1) / np.float32(255)))


@pytest.mark.cuda
def test_normalize_is_the_same_on_cuda(data):
    """Every byte value, normalized on CUDA and on the CPU, bit for bit (CUDA divides by a host scalar as a
    multiplication by its reciprocal: the divisor is a device tensor)."""
    x = _every_byte()
    assert torch.equal(normalize(x, data.norm), normalize(x.cuda(), data.norm).cpu())


@pytest.mark.cuda  # skipped without a CUDA device (tests/conftest.py); the rest of the CUDA tier: tests/test_cuda.py
def test_cpu_and_cuda_give_identical_images(data):
    spec = spec_for(data)
    idx = torch.arange(len(data))
    cpu, _ = augment(data.images, idx, spec, view=1)
    gpu, _ = augment(data.images.cuda(), idx.cuda(), spec, view=1)
    assert torch.equal(cpu, gpu.cpu())


def test_every_hash_field_belongs_to_one_draw():
    """The one table of counter-hash fields: no two draws share a number (they would draw the same bits), and the
    numbers the recipes use are the table's (32-px: 0..2, order: 11, RandomResizedCrop: 12 and 16..55)."""
    numbers = list(counter.FIELDS.values())
    assert len(set(numbers)) == len(numbers)
    assert set(numbers) == {0, 1, 2, 11, 12, *range(16, 56)}
