"""train-teacher's recipe per kind of data: the reference's on 28-32 px data, torchvision's on image folders.

The values left out (None) are resolved from the dataset's kind; every given value wins; the run records the
resolved numbers (tests/test_folder_data.py checks a folder run's checkpoint, tests/test_train.py the 32-px runs).
"""

import pytest
from configs import train_cfg

from camkd.config import OptimConfig
from camkd.train import RECIPE_FIELDS, recipe, resolve_recipe, teacher_optim

REFERENCE = dict(epochs=240, batch_size=64, lr_decay_epochs=[150, 180, 210], lr_decay_rate=0.1, momentum=0.9,
                 weight_decay=5e-4, nesterov=False, drop_last=False, micro_batches=1)
TORCHVISION = dict(epochs=90, batch_size=256, lr=0.1, lr_decay_epochs=[30, 60, 80], lr_decay_rate=0.1, momentum=0.9,
                   weight_decay=1e-4, nesterov=False, drop_last=False, micro_batches=1)


def _values(optim: OptimConfig, keys) -> dict:
    return {k: getattr(optim, k) for k in keys}


def test_unset_values_wait_for_the_data():
    o = teacher_optim()
    assert all(getattr(o, k) is None for k in (*RECIPE_FIELDS, "lr")) and (o.nesterov, o.drop_last) == (False, False)


@pytest.mark.parametrize("dataset", ["cifar100", "cifar10", "fashion-mnist", "synthetic"])
@pytest.mark.parametrize(("arch", "lr"), [("resnet8", 0.05), ("MobileNetV2", 0.01)])
def test_in_memory_data_keep_the_reference_recipe(dataset, arch, lr):
    got = resolve_recipe(teacher_optim(), dataset, arch)
    assert _values(got, REFERENCE) == REFERENCE and got.lr == lr
    assert got == OptimConfig(nesterov=False, drop_last=False, lr=lr)  # exactly the recipe of before


@pytest.mark.parametrize("dataset", ["imagefolder", "tinyimagenet"])
def test_image_folders_get_torchvisions_recipe(dataset):
    got = resolve_recipe(teacher_optim(), dataset, "tv:resnet50")
    assert _values(got, TORCHVISION) == TORCHVISION
    assert recipe(dataset).lr is None  # it depends on the batch
    for batch, lr in ((512, 0.2), (64, 0.025), (8, 0.003125)):  # lr 0.1 per 256 images of the global batch
        o = teacher_optim()
        o.batch_size = batch
        assert resolve_recipe(o, dataset, "resnet8").lr == lr


def test_given_values_win():
    for dataset in ("cifar100", "imagefolder"):
        given = dict(epochs=7, batch_size=32, lr=0.3, lr_decay_epochs=[2, 5], lr_decay_rate=0.5, momentum=0.8,
                     weight_decay=0.0, nesterov=True, micro_batches=2)
        o = teacher_optim()
        for k, v in given.items():
            setattr(o, k, v)
        assert _values(resolve_recipe(o, dataset, "resnet8"), given) == given, dataset


def test_tests_configs_resolve_the_same_way():
    """tests/configs.py's train_cfg leaves the recipe's values unset unless given, as the CLI does."""
    cfg = train_cfg(arch="resnet8", dataset="imagefolder", epochs=2)
    got = resolve_recipe(cfg.optim, cfg.data.dataset, cfg.arch)
    assert got.epochs == 2 and got.batch_size == 256 and got.weight_decay == 1e-4


def test_help_states_both_defaults(cli):
    out = " ".join(cli("train-teacher", "--help").output.split())
    for text in ("Training epochs [default: 240; 90 for image folders]", "[default: 64; 256 for image folders]",
                 "0.1 x batch / 256 for image folders", "[default: 150,180,210; 30,60,80 for image folders]",
                 "SGD weight decay [default: 0.0005; 0.0001 for image folders]", "SGD momentum [default: 0.9]"):
        assert text in out, text


def test_bad_recipe_values_are_one_line(cli, one_error, tmp_path):
    base = ("train-teacher", "--arch", "resnet8", "--dataset", "synthetic", "--out", tmp_path / "r")
    one_error(cli(*base, "--momentum", "-1"), r"--momentum")
    one_error(cli(*base, "--weight-decay", "-0.1"), r"--weight-decay")
    one_error(cli(*base, "--lr-decay-epochs", "x"), r"--lr-decay-epochs takes epochs")
