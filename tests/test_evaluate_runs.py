"""`camkd evaluate RUN/last.pth` gives the run's own last test_top1 and test_loss, for every kind of run.

Kinds of run: a teacher (train-teacher), a student from a store (cache-teachers, then distill -c), a student
--online without a store; each on 32-px-style in-memory data (synthetic), an image folder and tiny-imagenet, all at
a non-default 16 px (the folders' defaults are 224 and 64, so a split reopened at the default size shows), and one
bf16 teacher (its metrics came from a bf16 forward). Then distill's optimizer defaults on image folders: the recipe
train-teacher uses there (camkd.train.recipe), given values winning, a run made before that still resuming, and the
small-lr rule's torchvision forms.
"""

import json

import pytest
import torch
from folder_helpers import make_folder, make_tiny
from typer.testing import CliRunner

from camkd.config import DataConfig, OptimConfig, RunConfig
from camkd.distill import DistillConfig, distill, distill_optim
from camkd.job import default_lr
from camkd.train import resolve_recipe, teacher_optim

SIZE = "16"
KINDS = ("synthetic", "imagefolder", "tinyimagenet")
RUNS = ("teacher", "cached", "online")


def _cli(*args) -> str:
    from camkd.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def _data_args(kind: str, root) -> tuple:
    """The options that name one kind's data at 16 px (loader options too: --online and train-teacher take them)."""
    if kind == "synthetic":
        return ("--dataset", "synthetic", "--image-size", SIZE, "--limit", "32")
    return ("--dataset", kind, "--data-dir", root, "--image-size", SIZE, "--workers", "0")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per kind of data: a teacher, a store of it, a student from the store (the recipe's defaults but for --epochs
    and --batch-size) and one --online (with --lr given); plus a bf16 teacher. Each 1 epoch at 16 px."""
    tmp = tmp_path_factory.mktemp("evaluate_runs")
    folder = make_folder(tmp / "folder", train=4, val=2)
    roots = {"synthetic": None, "imagefolder": folder, "tinyimagenet": make_tiny(tmp / "tiny", folder)}
    out: dict = {}
    for kind, root in roots.items():
        data = _data_args(kind, root)
        teacher, store = tmp / kind / "teacher", tmp / kind / "store.zarr"
        _cli("train-teacher", "-m", "resnet8", *data, "--epochs", "1", "--batch-size", "8", "--lr", "0.05",
             "--device", "cpu", "--out", teacher, "-q")
        _cli("cache-teachers", "-t", teacher / "last.pth", *data, "--views", "1", "--dtype", "float32",
             "--batch-size", "8", "--no-eval", "--device", "cpu", "--out", store, "-q")
        student = ("distill", "-m", "resnet8", "--method", "kd", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
                   "-q")
        _cli(*student, "-c", store, *(("--data-dir", root, "--workers", "0") if root else ()), "--out", tmp / kind / "cached")
        _cli(*student, "--online", "-t", teacher / "last.pth", *data, "--lr", "0.05", "--out", tmp / kind / "online")
        out[kind] = {"root": root, "store": store, **{run: tmp / kind / run for run in RUNS}}
    _cli("train-teacher", "-m", "resnet8", *_data_args("synthetic", None), "--epochs", "1", "--batch-size", "8",
         "--lr", "0.05", "--precision", "bf16", "--device", "cpu", "--out", tmp / "bf16", "-q")
    out["bf16"] = tmp / "bf16"
    return out


def _last_metrics(run) -> dict:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]


def _evaluate(run, *args) -> dict:
    return json.loads(_cli("evaluate", run / "last.pth", "--device", "cpu", "--json", *args))


def _agree(got: dict, rec: dict) -> None:
    assert got["top1"] == rec["test_top1"] and got["top5"] == rec["test_top5"]
    assert got["loss"] == pytest.approx(rec["test_loss"], rel=1e-6, abs=0)


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_equals_the_runs_last_metrics(runs, kind, run):
    path = runs[kind][run]
    got, rec = _evaluate(path), _last_metrics(path)
    assert (got["epoch"], got["precision"]) == (rec["epoch"], "fp32")
    meta = torch.load(path / "last.pth", weights_only=False)["meta"]
    assert meta["image_size"] == int(SIZE) and got["samples"] == {"synthetic": 256}.get(kind, 6)
    _agree(got, rec)


def test_evaluate_uses_the_runs_precision(runs):
    got, rec = _evaluate(runs["bf16"]), _last_metrics(runs["bf16"])
    assert got["precision"] == "bf16"
    _agree(got, rec)
    fp32 = _evaluate(runs["bf16"], "--precision", "fp32")  # another forward: the run's metrics are not its numbers
    assert fp32["precision"] == "fp32" and fp32["loss"] != rec["test_loss"]
    assert ", bf16)" in _cli("evaluate", runs["bf16"] / "last.pth", "--device", "cpu")


# -- distill's optimizer defaults follow the data's recipe ---------------------------------------------------------

def _optim(run) -> dict:
    return torch.load(run / "last.pth", weights_only=False)["meta"]["options"]["optim"]


@pytest.mark.parametrize("kind", ["imagefolder", "tinyimagenet"])
def test_distill_on_a_folder_records_the_folder_recipe(runs, kind):
    cached = _optim(runs[kind]["cached"])  # only --epochs 1 --batch-size 8 given: torchvision's recipe, lr 0.1 x 8 / 256
    assert (cached["lr"], cached["lr_decay_epochs"], cached["lr_decay_rate"], cached["momentum"], cached["weight_decay"],
            cached["nesterov"]) == (0.003125, [30, 60, 80], 0.1, 0.9, 1e-4, True)
    online = _optim(runs[kind]["online"])  # --lr 0.05 given: it wins, the rest is still the recipe's
    assert (online["lr"], online["lr_decay_epochs"], online["weight_decay"]) == (0.05, [30, 60, 80], 1e-4)
    memory = _optim(runs["synthetic"]["cached"])  # 32-px data keep the reference's
    assert (memory["lr"], memory["lr_decay_epochs"], memory["weight_decay"]) == (0.05, [150, 180, 210], 5e-4)


def test_distill_on_a_folder_defaults_to_the_recipes_batch(runs, one_error, cli, tmp_path):
    one_error(cli("distill", "-c", runs["imagefolder"]["store"], "-m", "resnet8", "--method", "kd", "--data-dir",
                  runs["imagefolder"]["root"], "--workers", "0", "--device", "cpu", "--out", tmp_path / "s"),
              r"--batch-size 256 is larger than the 12 training samples")


def test_a_folder_run_made_before_the_recipe_resumes(runs, tmp_path):
    """A run from before distill followed the folder recipe recorded the 32-px numbers (given explicitly here, as the
    CLI then passed them); resumed with the defaults it continues with those, not the recipe's."""
    kind = runs["imagefolder"]
    out = tmp_path / "old"
    distill(DistillConfig(arch="resnet8", method="kd", cache=str(kind["store"]),
                          data=DataConfig(dataset=None, data_dir=str(kind["root"]), options={"workers": 0}),
                          optim=OptimConfig(epochs=1, batch_size=8, lr=0.05),
                          run=RunConfig(out=str(out), device="cpu", progress=False)))
    _cli("distill", "-c", kind["store"], "-m", "resnet8", "--method", "kd", "--epochs", "2", "--data-dir", kind["root"],
         "--workers", "0", "--device", "cpu", "--resume", "--out", out, "-q")
    optim = _optim(out)
    assert _last_metrics(out)["epoch"] == 2
    assert (optim["epochs"], optim["batch_size"], optim["lr"], optim["lr_decay_epochs"], optim["weight_decay"]) == \
        (2, 8, 0.05, [150, 180, 210], 5e-4)


@pytest.mark.parametrize("arch", ["MobileNetV2", "ShuffleV2", "tv:mobilenet_v2", "tv:mobilenet_v3_large",
                                  "tv:shufflenet_v2_x0_5", "tv:shufflenet_v2_x1_0"])
def test_small_lr_archs_and_their_torchvision_forms(arch):
    assert default_lr(arch) == 0.01
    for optim in (teacher_optim(), distill_optim()):
        assert resolve_recipe(optim, "cifar100", arch).lr == 0.01
        assert resolve_recipe(optim, "imagefolder", arch).lr == 0.02  # a fifth of 0.1 per 256, at batch 256
        assert resolve_recipe(optim, "tinyimagenet", arch).batch_size == 256
    assert default_lr("tv:resnet18") == 0.05 and resolve_recipe(distill_optim(), "imagefolder", "tv:resnet18").lr == 0.1


# -- every run and store records how its data opens again (SplitOptions) ---------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_runs_and_stores_record_how_their_data_reopens(runs, kind):
    """The store and every checkpoint carry the options that reopen the data (16 px, the loader's defaults made
    explicit); a student from the store records the store's."""
    from camkd.data import SplitOptions
    from camkd.store import open_store

    stored = open_store(runs[kind]["store"]).description
    assert stored.reopen is not None and stored.split_options.options["image_size"] == int(SIZE)
    for run in RUNS:
        reopen = SplitOptions.from_dict(torch.load(runs[kind][run] / "last.pth", weights_only=False)["meta"]["reopen"])
        assert reopen.dataset == kind and reopen.options["image_size"] == int(SIZE)
        assert reopen.needs_data_dir == (kind != "synthetic") and "workers" not in reopen.options
    cached = torch.load(runs[kind]["cached"] / "last.pth", weights_only=False)["meta"]["reopen"]
    assert cached == stored.reopen


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_from_before_reopen_evaluates_as_it_trained(runs, kind, run, tmp_path):
    """A checkpoint written before ``reopen`` was recorded (the key removed) opens its data as before: evaluate still
    equals its metrics."""
    ckpt = torch.load(runs[kind][run] / "last.pth", weights_only=False)
    del ckpt["meta"]["reopen"]
    (tmp_path / "old").mkdir()
    torch.save(ckpt, tmp_path / "old" / "last.pth")
    got = _evaluate(tmp_path / "old")
    _agree(got, _last_metrics(runs[kind][run]))


def test_a_store_from_before_reopen_serves_its_data(runs, tmp_path):
    """A store whose attrs lack ``reopen`` (an earlier camkd's) gives its data the old meaning: a student trains from
    it, and evaluate of that student equals its metrics."""
    import shutil

    import zarr

    for kind in ("synthetic", "imagefolder"):
        old = tmp_path / f"{kind}.zarr"
        shutil.copytree(runs[kind]["store"], old)
        g = zarr.open_group(str(old), mode="r+")
        attrs = dict(g.attrs["camkd"])
        del attrs["reopen"]
        g.attrs["camkd"] = attrs
        root = runs[kind]["root"]
        out = tmp_path / f"{kind}_student"
        _cli("distill", "-m", "resnet8", "--method", "kd", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "-q",
             "-c", old, *(("--data-dir", root, "--workers", "0") if root else ()), "--out", out)
        _agree(_evaluate(out), _last_metrics(out))
        assert _evaluate(out)["samples"] == _evaluate(runs[kind]["cached"])["samples"]  # the same test split


def test_no_reader_of_a_split_branches_on_the_datasets_name():
    """reader, evaluate and train reopen a split by its recorded options and the data's kind, not by its name."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "camkd"
    for path in ("store/reader.py", "evaluate.py", "train.py"):
        text = (root / path).read_text()
        assert '"synthetic"' not in text and "FOLDER_DATASETS" not in text, path


def test_a_store_serves_the_whole_test_split_whatever_its_training_size(tmp_path):
    """A store made from N generated training samples (options num_samples) serves the dataset's whole test split at
    its form, as it always has (not N test samples: bench protocol's 50,000 would otherwise be evaluated each epoch)."""
    from camkd.cache import CacheConfig, cache_teachers
    from camkd.data import load_split
    from camkd.models import create_model
    from camkd.store import open_store
    from camkd.store.reader import load_cached_data

    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8", num_classes=10, in_channels=3).state_dict()}, tmp_path / "t.pth")
    cache_teachers(CacheConfig(teachers=[f"resnet8={tmp_path / 't.pth'}"], dataset="synthetic", views=1, features=["none"],
                               options={"num_samples": 48, "image_size": 8}, device="cpu", out=str(tmp_path / "s.zarr"),
                               progress=False, evaluate=False))
    train, test, _ = load_cached_data(open_store(tmp_path / "s.zarr"))
    assert len(train) == 48 and len(test) == len(load_split("synthetic", "test", image_size=8)) == 256
