"""The one dataset interface (camkd.data.base.DataSplit) of the in-memory split: what fit, the store and evaluation use."""

import numpy as np
import torch

from camkd.data import load_dataset
from camkd.data.norm import normalize
from camkd.data.views import augment


def test_view_batches_are_augment_bit_for_bit():
    data = load_dataset("synthetic", "train", num_samples=100)
    spec = data.aug_spec(3)
    batches = [np.arange(0, 40), np.array([99, 5, 17, 5]), np.arange(60, 100)[::-1].copy()]
    for idx, (images, params, hashes) in zip(batches, data.view_batches(spec, 2, batches, torch.device("cpu")), strict=True):
        x, ref_params = augment(data.images, idx, spec, view=2)
        assert images.dtype == torch.uint8 and hashes is None
        assert torch.equal(params, ref_params) and torch.equal(normalize(images, spec.norm), x)


def test_subset_and_eval_batches():
    data = load_dataset("synthetic", "test", num_samples=50)
    part = data.subset(10, 30)
    assert len(part) == 20 and torch.equal(part.labels, data.labels[10:30])
    got = list(part.eval_batches(8, torch.device("cpu")))
    assert [len(y) for _, y in got] == [8, 8, 4]
    assert torch.equal(torch.cat([x for x, _ in got]), data.images[10:30])
    assert (part.in_channels, part.image_size) == (data.images.shape[1], data.images.shape[-1])
