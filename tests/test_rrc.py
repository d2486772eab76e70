"""RandomResizedCrop boxes: a pure function of (seed, view, index, image size), distributed as torchvision's."""

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import CenterCrop, InterpolationMode, RandomResizedCrop, Resize

from camkd.data.rrc import RATIO, SCALE, below, center_crop_box, rrc_boxes, uniform01

N = 20_000
# Two-sample Kolmogorov-Smirnov: with n = m = N, two samples of one distribution exceed
# c * sqrt(2 / N) with probability alpha, c = sqrt(-ln(alpha / 2) / 2); alpha = 1e-6 gives 0.027.
# Ties among integer-valued boxes only make the test more conservative.
KS_CRIT = math.sqrt(-math.log(1e-6 / 2) / 2) * math.sqrt(2 / N)


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance between the two empirical distribution functions."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size).max())


def torchvision_boxes(h: int, w: int, n: int, scale=SCALE, ratio=RATIO) -> np.ndarray:
    torch.manual_seed(0)
    img = torch.empty(1, h, w)
    return np.array([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


def area_and_log_ratio(boxes: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return boxes[:, 2] * boxes[:, 3] / (h * w), np.log(boxes[:, 3] / boxes[:, 2])


def test_golden_boxes():
    """The mapping from hashes to boxes is part of the store's format: a change must change RECIPE."""
    boxes, flips = rrc_boxes(0, 0, np.arange(4), 375, 500)
    assert boxes.dtype == np.int32 and flips.dtype == np.uint8
    assert boxes.tolist() == [[18, 129, 176, 166], [85, 186, 281, 265], [135, 91, 202, 247], [2, 58, 360, 362]]
    assert flips.tolist() == [1, 0, 1, 0]


def test_pure_and_independent_of_batch_and_order():
    rng = np.random.default_rng(0)
    idx = np.arange(3000)
    hs, ws = rng.integers(1, 700, idx.size), rng.integers(1, 700, idx.size)
    boxes, flips = rrc_boxes(7, 3, idx, hs, ws)
    again, flips_again = rrc_boxes(7, 3, idx, hs, ws)
    assert np.array_equal(boxes, again) and np.array_equal(flips, flips_again)
    perm = rng.permutation(idx.size)[:1000]  # another order, a subset of the batch
    sub, sub_flips = rrc_boxes(7, 3, idx[perm], hs[perm], ws[perm])
    assert np.array_equal(sub, boxes[perm]) and np.array_equal(sub_flips, flips[perm])
    one, one_flip = rrc_boxes(7, 3, np.array([1234]), hs[1234], ws[1234])
    assert np.array_equal(one[0], boxes[1234]) and one_flip[0] == flips[1234]


def test_boxes_inside_the_image():
    rng = np.random.default_rng(1)
    hs, ws = rng.integers(1, 400, N), rng.integers(1, 400, N)
    hs[:100], ws[100:200] = 1, 1  # one-pixel rows and columns
    top, left, h, w = rrc_boxes(0, 0, np.arange(N), hs, ws)[0].T.astype(np.int64)
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= hs).all() and (left + w <= ws).all()


@pytest.mark.parametrize("h, w", [(1000, 10), (10, 1000)])
def test_fallback_when_no_try_fits(h, w):
    """An area of at least 8 % of 1000x10 pixels at ratio 3/4..4/3 needs both sides >= 24: no try fits,
    and torchvision's get_params returns its (deterministic) fallback, which must be ours exactly."""
    expect = RandomResizedCrop.get_params(torch.empty(1, h, w), list(SCALE), list(RATIO))
    boxes, _ = rrc_boxes(0, 0, np.arange(50), h, w)
    assert (boxes == np.array(expect)).all(), (boxes[:3], expect)
    assert expect == ((493, 0, 13, 10) if h > w else (0, 493, 10, 13))


def test_fallback_rate_matches_torchvision():
    """10x40: a try fits only about 20 % of the time, so about 10 % of boxes are the fallback
    (0, 13, 10, 13); the rates agree within 5 standard errors of their difference."""
    n = 10_000
    ours = rrc_boxes(0, 0, np.arange(n), 10, 40)[0]
    theirs = torchvision_boxes(10, 40, n)
    fallback = np.array([0, 13, 10, 13])
    p, q = (ours == fallback).all(1).mean(), (theirs == fallback).all(1).mean()
    assert 0.05 < q < 0.2
    assert abs(p - q) < 5 * math.sqrt(2 * q * (1 - q) / n), (p, q)


@pytest.mark.parametrize("h, w", [(375, 500), (224, 224), (40, 9)])
def test_distribution_matches_torchvision(h, w):
    ours = rrc_boxes(11, 0, np.arange(N), h, w)[0].astype(np.int64)
    theirs = torchvision_boxes(h, w, N)
    for a, b in zip(area_and_log_ratio(ours, h, w), area_and_log_ratio(theirs, h, w)):
        assert ks(a, b) < KS_CRIT, ks(a, b)
        assert abs(a.mean() - b.mean()) < 5 * math.sqrt((a.var() + b.var()) / N)
    for col in (0, 1):  # top and left
        assert ks(ours[:, col], theirs[:, col]) < KS_CRIT


def test_distribution_test_can_fail():
    """The KS bound detects a modestly different scale or ratio range."""
    theirs = torchvision_boxes(375, 500, N)
    area, log_r = area_and_log_ratio(theirs, 375, 500)
    wrong_scale = rrc_boxes(11, 0, np.arange(N), 375, 500, scale=(0.15, 1.0))[0].astype(np.int64)
    wrong_ratio = rrc_boxes(11, 0, np.arange(N), 375, 500, ratio=(0.7, 1.4))[0].astype(np.int64)
    assert ks(area_and_log_ratio(wrong_scale, 375, 500)[0], area) > KS_CRIT
    assert ks(area_and_log_ratio(wrong_ratio, 375, 500)[1], log_r) > KS_CRIT


def test_flips_about_half_and_views_seeds_differ():
    idx = np.arange(N)
    boxes, flips = rrc_boxes(0, 0, idx, 375, 500)
    assert set(flips.tolist()) == {0, 1}
    assert abs(flips.mean() - 0.5) < 5 * math.sqrt(0.25 / N)
    for other in (rrc_boxes(0, 1, idx, 375, 500), rrc_boxes(1, 0, idx, 375, 500)):
        assert (other[0] == boxes).all(1).mean() < 0.01
        assert abs((other[1] == flips).mean() - 0.5) < 0.05


def test_tiny_images():
    assert rrc_boxes(0, 0, np.arange(100), 1, 1)[0].tolist() == [[0, 0, 1, 1]] * 100
    assert RandomResizedCrop.get_params(torch.empty(1, 1, 1), list(SCALE), list(RATIO)) == (0, 0, 1, 1)
    for h, w in [(2, 2), (1, 5), (5, 1), (3, 2)]:
        top, left, bh, bw = rrc_boxes(0, 0, np.arange(500), h, w)[0].T
        assert (bh >= 1).all() and (bw >= 1).all() and (top + bh <= h).all() and (left + bw <= w).all()


def test_square_224_covers_the_range():
    top, left, h, w = rrc_boxes(0, 0, np.arange(N), 224, 224)[0].T.astype(np.int64)
    area = h * w / 224**2
    assert area.min() < 0.09 and area.max() == 1.0  # whole-image crops happen (scale up to 1)
    assert ((w - 0.5) / (h + 0.5) <= 4 / 3).all() and ((w + 0.5) / (h - 0.5) >= 3 / 4).all()  # in range before rounding


def test_hash_mapping():
    top = np.array([0, 2**63, 2**64 - 1], dtype=np.uint64)
    assert uniform01(top).tolist() == [0.0, 0.5, 1.0 - 2.0**-53]
    assert below(top, np.array([7, 7, 7])).tolist() == [0, 3, 6]
    assert below(top, np.array([1, 1, 1])).tolist() == [0, 0, 0]
    assert below(top, np.array([2**32 - 1] * 3)).tolist() == [0, 2**31 - 1, 2**32 - 2]


@pytest.mark.parametrize("bad", [dict(indices=[-1]), dict(heights=0), dict(widths=-3), dict(scale=(0.5, 0.1)),
                                 dict(ratio=(0.0, 1.0))])
def test_bad_input(bad):
    kw = dict(indices=[0], heights=10, widths=10)
    kw.update(bad)
    with pytest.raises(ValueError):
        rrc_boxes(0, 0, kw.pop("indices"), kw.pop("heights"), kw.pop("widths"), **kw)


@pytest.mark.parametrize("h, w, size", [(375, 500, 224), (500, 375, 224), (64, 64, 64), (333, 100, 64), (7, 9, 5)])
def test_center_crop_box_is_torchvisions_eval_geometry(h, w, size):
    g = center_crop_box(h, w, size)
    resized = Resize(round(size / 0.875), interpolation=InterpolationMode.NEAREST)(torch.zeros(1, h, w))
    assert (g.resize_h, g.resize_w) == tuple(resized.shape[1:])
    where = torch.arange(g.resize_h * g.resize_w).view(1, g.resize_h, g.resize_w)
    crop = CenterCrop(size)(where)
    assert crop.shape[1:] == (size, size) and int(crop[0, 0, 0]) == g.top * g.resize_w + g.left
    assert center_crop_box(375, 500, 224)[:4] == (256, 341, 16, 58)


def test_center_crop_box_bad_input():
    with pytest.raises(ValueError):
        center_crop_box(10, 10, 8, crop_fraction=1.5)
    with pytest.raises(ValueError):
        center_crop_box(0, 10, 8)
