"""An image size or batch size whose single batch could not be allocated here is refused in one `error:` line before
any allocation (no traceback from a decoder or a convolution, no run folder left): train-teacher, cache-teachers and
distill --online on an image folder, and the synthetic set, which is made in memory whole."""

import time

import pytest
from folder_helpers import make_folder

from camkd.device import free_memory
from camkd.memory import activation_bytes
from camkd.models import create_model

pytestmark = pytest.mark.skipif(free_memory(__import__("torch").device("cpu")) is None, reason="free memory unknown here")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("memory") / "data", train=100, val=1)  # 300 tiny training images


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("teacher") / "r18.pth"
    torch.save({"model": create_model("tv:resnet18", num_classes=3, in_channels=3).state_dict()}, path)
    return f"tv:resnet18={path}"


def _fast_error(one_error, result, pattern, started):
    line = one_error(result, pattern)
    assert time.monotonic() - started < 30  # refused before decoding 100000-px images or running a batch
    return line


def test_train_teacher_refuses_an_image_size_no_batch_fits(cli, one_error, folder, tmp_path):
    t = time.monotonic()
    _fast_error(one_error, cli("train-teacher", "-m", "tv:resnet18", "-d", "imagefolder", "--data-dir", folder,
                               "--image-size", "100000", "--batch-size", "8", "--workers", "0", "--epochs", "1",
                               "--device", "cpu", "--out", tmp_path / "r"),
                r"one batch of 8 images at 100000 px needs at least [\d.]+ TB \(pixels .*, tv:resnet18's activations for "
                r"training .*\), more than the [\d.]+ [GMT]B of .*; lower --image-size \(about \d+ px fits a batch of 2\)", t)
    assert not (tmp_path / "r").exists()


def test_train_teacher_refuses_a_batch_too_large(cli, one_error, folder, tmp_path):
    t = time.monotonic()
    line = _fast_error(one_error, cli("train-teacher", "-m", "tv:resnet18", "-d", "imagefolder", "--data-dir", folder,
                                      "--image-size", "2048", "--batch-size", "256", "--workers", "0", "--epochs", "1",
                                      "--device", "cpu", "--out", tmp_path / "r"),
                       r"one batch of 256 images at 2048 px needs at least .*; lower --batch-size \(a batch of about "
                       r"(\d+) fits\)", t)
    assert not (tmp_path / "r").exists()
    fits = int(line.rsplit("about ", 1)[1].split()[0])
    assert 2 <= fits < 256


def test_cache_teachers_refuses_an_image_size_no_batch_fits(cli, one_error, folder, teacher, tmp_path):
    t = time.monotonic()
    _fast_error(one_error, cli("cache-teachers", "-t", teacher, "-d", "imagefolder", "--data-dir", folder,
                               "--image-size", "100000", "--workers", "0", "-V", "1", "--device", "cpu", "-o", tmp_path / "s.zarr"),
                r"one batch of \d+ images at 100000 px needs at least .*the teachers' largest layer .*; lower "
                r"--image-size", t)
    assert not (tmp_path / "s.zarr").exists()


def test_online_distillation_refuses_an_image_size_no_batch_fits(cli, one_error, folder, teacher, tmp_path):
    t = time.monotonic()
    _fast_error(one_error, cli("distill", "-m", "tv:resnet18", "--online", "-t", teacher, "-d", "imagefolder",
                               "--data-dir", folder, "--image-size", "100000", "--batch-size", "8", "--workers", "0",
                               "--method", "kd", "--device", "cpu", "--out", tmp_path / "s"),
                r"one batch of 8 images at 100000 px needs at least .*lower --image-size", t)
    assert not (tmp_path / "s").exists()


def test_the_synthetic_set_too_large_to_make_is_refused(cli, one_error, tmp_path):
    t = time.monotonic()
    _fast_error(one_error, cli("train-teacher", "-m", "resnet8", "-d", "synthetic", "--image-size", "100000",
                               "--epochs", "1", "--device", "cpu", "--out", tmp_path / "r"),
                r"--image-size 100000: making the synthetic set \(1,?024 images of 3 x 100000 x 100000 px, in memory at "
                r"once\) needs about [\d.]+ TB, more than .*; lower --image-size", t)
    assert not (tmp_path / "r").exists()


def test_the_estimate_is_a_lower_bound_that_grows_with_the_area():
    """resnet8 keeps every layer's output for the backward: at least the first conv's output (16 channels at the
    input's size, float32) per image, and about four times that at twice the side (the pooled head's outputs do not
    grow)."""
    model = create_model("resnet8", num_classes=10, in_channels=3)
    small, large = activation_bytes(model, 3, 32), activation_bytes(model, 3, 64)
    assert small is not None and large is not None
    assert small[0] >= 16 * 32 * 32 * 4 and small[1] <= small[0]
    assert 0.99 * 4 * small[0] <= large[0] <= 4 * small[0]
    assert all(p.device.type == "cpu" for p in model.parameters())  # the meta forward left the model as it was
