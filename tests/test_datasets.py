"""Dataset loaders: real Fashion-MNIST, CIFAR in torchvision's format (small files), synthetic."""

import pickle

import numpy as np
import pytest
import torch

from camkd.data import load_dataset
from camkd.errors import CamkdError


def write_cifar100(root, n_train=20, n_test=10):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), "fine_labels": list(rng.integers(0, 100, n)),
                 "coarse_labels": list(rng.integers(0, 20, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return entry


def write_cifar10(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, per_batch))}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)


def test_cifar100_torchvision_format(tmp_path):
    last = write_cifar100(tmp_path)
    ds = load_dataset("cifar100", "test", data_dir=tmp_path)
    assert ds.images.shape == (10, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.num_classes == 100 and ds.norm.mean == (0.5071, 0.4867, 0.4408)
    assert torch.equal(ds.images.reshape(10, -1), torch.from_numpy(last["data"]))  # CHW order as torchvision
    assert ds.labels.tolist() == [int(v) for v in last["fine_labels"]]


def test_cifar10_concatenates_batches(tmp_path):
    write_cifar10(tmp_path)
    ds = load_dataset("cifar10", "train", data_dir=tmp_path, limit=15)
    assert len(ds) == 15 and ds.num_classes == 10


def test_cifar_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(CamkdError, match=r"not found.*--download"):
        load_dataset("cifar100", "train", data_dir=tmp_path)


def test_cifar_corrupted_batch(tmp_path):
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"garbage")
    with pytest.raises(CamkdError, match="cannot read CIFAR batch"):
        load_dataset("cifar100", "train", data_dir=tmp_path)


def test_fashion_mnist_real_files():
    ds = load_dataset("fashion-mnist", "test")
    assert ds.images.shape == (10000, 1, 28, 28) and ds.num_classes == 10
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.labels[:5].tolist() == [9, 2, 1, 1, 6]  # the published first labels of the test split


def test_fashion_mnist_missing_everywhere(tmp_path, monkeypatch):
    import camkd.data.fashion_mnist as fm

    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(CamkdError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train", data_dir=tmp_path)


def test_fashion_mnist_truncated(tmp_path):
    import gzip

    src = load_dataset("fashion-mnist", "test")
    raw = gzip.open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:5000])
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(open("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz", "rb").read())
    with pytest.raises(CamkdError, match="truncated"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert len(src) == 10000


def test_synthetic_deterministic_and_fingerprint():
    a = load_dataset("synthetic", "train", num_samples=64)
    b = load_dataset("synthetic", "train", num_samples=64)
    assert torch.equal(a.images, b.images) and a.fingerprint == b.fingerprint
    c = load_dataset("synthetic", "test", num_samples=64)
    assert a.fingerprint != c.fingerprint
    assert a.limit(32).fingerprint != a.fingerprint
    gray = load_dataset("synthetic", "train", num_samples=8, channels=1, image_size=28)
    assert gray.images.shape == (8, 1, 28, 28)


def test_unknown_dataset_lists_names():
    with pytest.raises(CamkdError, match="cifar10, cifar100, fashion-mnist, imagefolder, synthetic, tinyimagenet"):
        load_dataset("imagenet", "train")


def test_an_undecodable_file_is_one_line_with_or_without_workers(tmp_path):
    """A spawned worker's decode error reaches the main process as the file and the reason (not as the DataLoader's
    traceback text), so the line is the same as where the main process decodes itself."""
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / split / "ant").mkdir(parents=True)
        Image.new("RGB", (12, 10), (200, 30, 60)).save(tmp_path / split / "ant" / "a.jpg")
    bad = tmp_path / "train" / "ant" / "zz.jpg"
    bad.write_bytes(b"not an image")
    lines = []
    for workers in (0, 1):
        train = load_dataset("imagefolder", "train", data_dir=tmp_path, image_size=8, workers=workers)
        with pytest.raises(CamkdError) as e:
            list(train.view_batches(train.aug_spec(0), 0, [[0, 1]], torch.device("cpu")))
        lines.append(str(e.value))
    assert lines[0] == lines[1]
    assert lines[0].startswith(f"cannot decode {bad}: ") and lines[0].endswith("; fix or remove the file")
    assert "\n" not in lines[0] and "Traceback" not in lines[0]
