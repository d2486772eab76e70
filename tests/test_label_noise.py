"""train-teacher --label-noise: an exact, seeded fraction of labels moved to another class, recorded in the checkpoint."""

import numpy as np
import pytest
import torch

from camkd.data.noise import apply_label_noise, noisy_labels
from camkd.errors import CamkdError


def _labels(n=1000, c=10, seed=3):
    return np.random.default_rng(seed).integers(0, c, size=n)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.4, 0.999])
def test_exact_fraction_never_same_class(rate):
    y = _labels()
    new, idx = noisy_labels(y, 10, rate, seed=0)
    changed = np.flatnonzero(new != y)
    assert len(changed) == round(rate * len(y))  # exactly the recorded fraction
    assert np.array_equal(changed, idx)  # every chosen label changed: never to its own class
    assert new.min() >= 0 and new.max() < 10


def test_new_classes_cover_the_others():
    y = np.zeros(5000, dtype=np.int64)  # all class 0: the new classes must be spread over 1..9
    new, idx = noisy_labels(y, 10, 0.5, seed=1)
    counts = np.bincount(new[idx], minlength=10)
    assert counts[0] == 0 and (counts[1:] > 200).all()


def test_reproducible_and_seeded():
    y = _labels()
    a, ia = noisy_labels(y, 10, 0.4, seed=0)
    b, ib = noisy_labels(y, 10, 0.4, seed=0)
    c, ic = noisy_labels(y, 10, 0.4, seed=1)
    assert np.array_equal(a, b) and np.array_equal(ia, ib)
    assert not np.array_equal(ia, ic) and not np.array_equal(a, c)
    assert np.array_equal(y, _labels())  # the input is not modified


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_rate_out_of_range(rate):
    with pytest.raises(CamkdError, match=r"\[0, 1\)"):
        noisy_labels(_labels(), 10, rate, seed=0)


def test_dataset_noise_changes_fingerprint_and_rate_zero_is_identity():
    from camkd.data import load_dataset

    ds = load_dataset("synthetic", "train", num_samples=200)
    same, rec = apply_label_noise(ds, 0.0, 5)
    assert same is ds and rec is None
    noisy, rec = apply_label_noise(ds, 0.25, 5)
    assert rec == {"rate": 0.25, "seed": 5, "changed": 50, "n": 200}
    assert int((noisy.labels != ds.labels).sum()) == 50 and torch.equal(noisy.images, ds.images)
    assert noisy.fingerprint != ds.fingerprint
    assert apply_label_noise(ds, 0.25, 6)[0].fingerprint != noisy.fingerprint


def test_train_teacher_records_noise(cli, one_error, tmp_path):
    out = tmp_path / "t"
    r = cli("train-teacher", "-m", "resnet8", "-d", "synthetic", "--epochs", "1", "--batch-size", "32", "--limit", "128",
            "--label-noise", "0.25", "--label-noise-seed", "7", "--device", "cpu", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    meta = torch.load(out / "last.pth", weights_only=True)["meta"]
    assert meta["label_noise"] == {"rate": 0.25, "seed": 7, "changed": 32, "n": 128}
    assert meta["options"]["data"]["label_noise"] == 0.25 and meta["options"]["data"]["label_noise_seed"] == 7
    clean = tmp_path / "c"
    r = cli("train-teacher", "-m", "resnet8", "-d", "synthetic", "--epochs", "1", "--batch-size", "32", "--limit", "128",
            "--device", "cpu", "--out", clean, "-q")
    assert r.exit_code == 0, r.output
    cmeta = torch.load(clean / "last.pth", weights_only=True)["meta"]
    assert cmeta["label_noise"] is None and cmeta["dataset_fingerprint"] != meta["dataset_fingerprint"]
    # resuming the noisy run with another seed is refused: a noisy teacher is a different run
    r = cli("train-teacher", "-m", "resnet8", "-d", "synthetic", "--epochs", "2", "--batch-size", "32", "--limit", "128",
            "--label-noise", "0.25", "--label-noise-seed", "8", "--device", "cpu", "--out", out, "--resume", "-q")
    one_error(r, r"was made with --label-noise-seed 7, this run has --label-noise-seed 8; resume with the same --label-noise-seed")


def test_cli_rejects_bad_rate(cli, one_error, tmp_path):
    r = cli("train-teacher", "-m", "resnet8", "-d", "synthetic", "--label-noise", "1", "--out", tmp_path / "x")
    one_error(r, r"^error: --label-noise")
    assert not (tmp_path / "x").exists()
