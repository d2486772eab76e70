"""`camkd demo` (the README's main job) run for real at a tiny setting: teachers, store, students, the table."""

import gzip
import re

import numpy as np
import pytest

from camkd.data.fashion_mnist import DEBIAN_DIR, read_idx

TRAIN, TEST = 256, 128


def write_idx(path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (Fashion-MNIST's own format), gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def small_fashion_mnist(tmp_path_factory):
    """The first images of Debian's Fashion-MNIST, written back in its own format (the demo reads a folder)."""
    if not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("apt-get install -y dataset-fashion-mnist (the README's commands install it)")
    root = tmp_path_factory.mktemp("fm")
    for stem, n in (("train", TRAIN), ("t10k", TEST)):
        for kind in ("images-idx3", "labels-idx1"):
            write_idx(root / f"{stem}-{kind}-ubyte.gz", read_idx(DEBIAN_DIR / f"{stem}-{kind}-ubyte.gz")[:n])
    return root


def test_demo_prints_the_table_of_every_model(cli, small_fashion_mnist, tmp_path):
    args = ("demo", "--data-dir", small_fashion_mnist, "--epochs", "1", "--limit", TRAIN, "--device", "cpu", "--quiet", "--out", tmp_path)
    r = cli(*args)
    assert r.exit_code == 0, r.output
    rows = re.findall(r"^\| (.+?) \| (\d+\.\d\d) \|$", r.output, flags=re.M)
    names = [name for name, _ in rows]
    assert names == ["teacher resnet20", "teacher resnet14", "teacher wrn_16_1",
                     "student resnet8 (camkd, from cache)", "student resnet8 (avg, from cache)"], r.output
    assert all(0.0 <= float(acc) <= 100.0 for _, acc in rows)
    assert "| model | test top-1 % |" in r.output
    folder = tmp_path / f"epochs1_limit{TRAIN}"
    assert (folder / "fashion-mnist.zarr" / "zarr.json").is_file()
    assert all((folder / "students" / m / "last.pth").is_file() for m in ("camkd", "avg"))
    # a rerun with the same settings reuses the finished runs: the same accuracies, nothing trained again
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert re.findall(r"^\| (.+?) \| (\d+\.\d\d) \|$", again.output, flags=re.M) == rows
