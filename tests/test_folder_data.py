"""Image-folder datasets through the one pipeline: decoded views and their hashes, worker processes,
tiny-imagenet-200's layout, training and evaluating a teacher, bad input.

The tests use small folders (tests/folder_helpers.py) and train at --image-size 32 with the CIFAR zoo's resnet8.
"""

import json
import shutil

import numpy as np
import torch
from decode_helpers import load_eval, load_train_view, pixel_hash
from folder_helpers import SIZE, make_folder, make_tiny

from camkd.data import load_dataset
from camkd.data.norm import normalize


def test_views_are_the_decoders_and_hashed(folder):
    train = load_dataset("imagefolder", "train", data_dir=folder, image_size=32, workers=0)
    assert (len(train), train.num_classes, train.in_channels, train.image_size) == (24, 3, 3, 32)
    spec = train.aug_spec(5)
    idx = [np.array([3, 0, 17]), np.array([23, 3])]
    got = list(train.view_batches(spec, 2, idx, torch.device("cpu")))
    for batch, (x, params, hashes) in zip(idx, got, strict=True):
        assert x.dtype == torch.uint8 and x.shape == (len(batch), 3, 32, 32) and params.shape == (len(batch), 5)
        for row, i in enumerate(batch):
            ref, box, flip = load_train_view(train.listing.file(int(i)), seed=5, view=2, index=int(i), size=32)
            assert torch.equal(x[row], ref) and params[row].tolist() == [*box.tolist(), flip]
            assert hashes[row] == pixel_hash(ref)
    assert torch.equal(got[0][0][0], got[1][0][1])  # sample 3 is the same view in any batch
    test = load_dataset("imagefolder", "test", data_dir=folder, image_size=32, workers=0)
    batches = list(test.eval_batches(5, torch.device("cpu")))
    assert [len(y) for _, y in batches] == [5, 5, 2]
    assert torch.equal(batches[2][0][1], load_eval(test.listing.file(11), 32))
    assert torch.equal(torch.cat([y for _, y in batches]), test.labels)


def test_worker_processes_give_the_same_views(folder):
    """Spawned workers (persistent across passes) decode the very bytes the main process does."""
    one = load_dataset("imagefolder", "train", data_dir=folder, image_size=32, workers=1)
    zero = load_dataset("imagefolder", "train", data_dir=folder, image_size=32, workers=0)
    spec, idx = one.aug_spec(0), [np.arange(0, 12), np.arange(12, 24)]
    for _ in range(2):  # a second pass reuses the workers
        for a, b in zip(one.view_batches(spec, 1, idx, torch.device("cpu")), zero.view_batches(spec, 1, idx, torch.device("cpu"))):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and np.array_equal(a[2], b[2])


def test_a_pass_starts_no_more_workers_than_it_has_batches(folder):
    """An evaluation of one batch with --workers 2 starts one worker (a second would get nothing and would still be
    importing torch when training resumes); a longer pass gets the workers it can use, then they stay."""
    cpu = torch.device("cpu")
    test = load_dataset("imagefolder", "test", data_dir=folder, image_size=32, workers=2)
    zero = load_dataset("imagefolder", "test", data_dir=folder, image_size=32, workers=0)
    (x, y), = test.eval_batches(len(test), cpu)  # one batch, decoded by the one worker
    assert torch.equal(x, next(zero.eval_batches(len(test), cpu))[0]) and torch.equal(y, test.labels)
    one = test.loader(cpu, 1)
    assert one.num_workers == 1 and test.loader(cpu, 1) is one
    two = test.loader(cpu, 3)
    assert two.num_workers == 2 and test.loader(cpu, 1) is two and test.loader(cpu, 5) is two
    assert zero.loader(cpu, 3).num_workers == 0


def test_tinyimagenet_lists_the_same_images(folder, tmp_path):
    tiny = load_dataset("tinyimagenet", "train", data_dir=make_tiny(tmp_path / "tiny", folder), workers=0)
    assert (len(tiny), tiny.num_classes, tiny.image_size) == (24, 3, 64)
    x = next(tiny.eval_batches(4, torch.device("cpu")))[0]
    assert x.shape == (4, 3, 64, 64) and normalize(x, tiny.norm).dtype == torch.float32


def test_train_teacher_and_evaluate_on_a_folder(cli, folder, tmp_path):
    out = tmp_path / "teacher"
    r = cli("train-teacher", "--arch", "resnet8", "--dataset", "imagefolder", "--data-dir", folder, "--image-size", SIZE,
            "--workers", "0", "--epochs", "2", "--batch-size", "8", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in records] == [1, 2]
    ckpt = torch.load(out / "last.pth", weights_only=False)
    assert ckpt["meta"]["image_size"] == 32 and ckpt["meta"]["dataset"] == "imagefolder"
    optim = ckpt["meta"]["options"]["optim"]  # torchvision's recipe, resolved: lr 0.1 x 8 / 256
    assert (optim["lr"], optim["lr_decay_epochs"], optim["weight_decay"], optim["momentum"]) == (0.003125, [30, 60, 80], 1e-4, 0.9)
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 1e-4
    r = cli("evaluate", out / "last.pth")
    assert r.exit_code == 0, r.output
    assert f"{records[-1]['test_top1']:.2f}%" in r.output


def test_bad_input(cli, one_error, folder, tmp_path):
    base = ("train-teacher", "--arch", "resnet8", "--dataset", "imagefolder", "--epochs", "1", "--out", tmp_path / "r")
    one_error(cli(*base), r"--data-dir")
    one_error(cli(*base, "--data-dir", tmp_path / "nope"), r"does not exist")
    (tmp_path / "empty").mkdir()
    one_error(cli(*base, "--data-dir", tmp_path / "empty"), r"no train/")
    one_error(cli(*base, "--data-dir", folder, "--image-size", "0"), r"--image-size must be at least 1")
    one_error(cli(*base, "--data-dir", folder, "--workers", "-1"), r"--workers must be 0")
    one_error(cli("train-teacher", "--arch", "resnet8", "--dataset", "cifar10", "--image-size", "64", "--out",
                  tmp_path / "c"), r"--image-size does not apply to cifar10")
    broken = make_folder(tmp_path / "broken", train=2, val=1)
    shutil.copy(__file__, broken / "train" / "ant" / "zz.jpg")  # not an image
    one_error(cli(*base, "--data-dir", broken, "--image-size", SIZE, "--workers", "0", "--batch-size", "2"),
              r"cannot decode .*zz\.jpg")
