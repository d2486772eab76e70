"""train-teacher: learns, refuses bad input with one line and exit 2 (resume: test_fit.py)."""

import json

import pytest
import torch
from configs import train_cfg

from camkd.checkpoint import load_checkpoint, sha256_file
from camkd.train import train_teacher

SMALL = dict(arch="resnet8", dataset="synthetic", batch_size=32, lr=0.05, synthetic_samples=384, progress=False, deterministic=True)


def test_learns_well_above_chance(tmp_path):
    s = train_teacher(train_cfg(**SMALL, epochs=3, out=str(tmp_path / "run")))
    assert s["best_top1"] > 60.0  # 10 classes: chance is 10%
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    ckpt = load_checkpoint(tmp_path / "run" / "best.pth")
    meta = ckpt["meta"]
    assert meta["arch"] == "resnet8" and meta["num_classes"] == 10 and meta["in_channels"] == 3 and meta["image_size"] == 32
    assert meta["dataset"] == "synthetic" and len(meta["dataset_fingerprint"]) == 64
    assert meta["options"]["optim"]["epochs"] == 3 and meta["accuracy"] == s["best_top1"]
    for name in ("best.pth", "last.pth"):
        digest = (tmp_path / "run" / f"{name}.sha256").read_text().split()[0]
        assert digest == sha256_file(tmp_path / "run" / name)


def test_one_channel_28px_and_limit(tmp_path):
    from camkd.data import load_dataset

    assert load_dataset("fashion-mnist", "train", limit=64).images.shape == (64, 1, 28, 28)
    s = train_teacher(train_cfg(arch="resnet8", dataset="fashion-mnist", limit=64, epochs=1, batch_size=32,
                                  progress=False, out=str(tmp_path / "f")))
    meta = load_checkpoint(tmp_path / "f" / "last.pth")["meta"]
    assert meta["in_channels"] == 1 and meta["image_size"] == 28 and meta["num_train"] == 64
    assert 0.0 <= s["last_top1"] <= 100.0


# ---- bad input: one line, exit code 2, no traceback -------------------------------------------

def base_args(tmp_path, *extra):
    return ["train-teacher", "--dataset", "synthetic", "--epochs", "1", "--quiet", "--out", tmp_path / "r", *extra]


def test_unknown_arch_lists_names(cli, tmp_path, one_error):
    one_error(cli(*base_args(tmp_path, "--arch", "resnet9")), r"unknown arch 'resnet9'.*resnet32x4.*vgg8")


def test_unknown_dataset_lists_names(cli, tmp_path, one_error):
    r = cli("train-teacher", "--arch", "resnet8", "--dataset", "imagenet", "--out", tmp_path / "r")
    one_error(r, r"--dataset.*'imagenet' is not one of.*cifar100.*fashion-mnist")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, pattern", [
    (("--epochs", "-1"), r"invalid value for '--epochs'"),
    (("--batch-size", "1"), r"invalid value for '--batch-size'"),
    (("--lr-decay-epochs", "150,x"), r"--lr-decay-epochs takes epochs"),
    (("--lr-decay-epochs", "-3"), r"--lr-decay-epochs must be positive"),
    (("--device", "tpu"), r"invalid value for '--device'"),
])
def test_range_and_choice_errors_are_one_line(cli, tmp_path, args, pattern, one_error):
    one_error(cli(*base_args(tmp_path, "--arch", "resnet8", *args)), pattern)
    assert not (tmp_path / "r").exists()


def test_missing_option_is_one_line(cli, tmp_path, one_error):
    one_error(cli("train-teacher", "--dataset", "synthetic"), r"missing option '--arch'")
    one_error(cli("cache-teachers", "--dataset", "synthetic", "-V", "1"), r"missing option '--teacher'")


def test_usage_error_points_at_the_help_of_the_command_used(cli, one_error):
    one_error(cli("bench", "speed", "--samples", "3"), r"'--samples'.*; see 'camkd bench speed --help'$")
    one_error(cli("distill", "--epochs", "0"), r"'--epochs'.*; see 'camkd distill --help'$")
    one_error(cli("nosuch"), r"no such command 'nosuch'; see 'camkd --help'$")


def test_names_are_checked_before_the_data_loads(cli, tmp_path, monkeypatch, one_error):
    import camkd.data.base as base

    def no_loading(*a, **k):
        raise AssertionError("the dataset was loaded before the names were checked")

    monkeypatch.setattr(base, "load_dataset", no_loading)
    one_error(cli(*base_args(tmp_path, "--arch", "resnet9")), r"unknown arch 'resnet9'")
    assert not (tmp_path / "r").exists()


def test_failed_run_leaves_no_folder(cli, tmp_path, one_error):
    one_error(cli(*base_args(tmp_path, "--arch", "resnet8", "--limit", "1")), r"no step would run")
    assert not (tmp_path / "r").exists()


def test_data_dir_without_the_dataset_is_an_error(cli, tmp_path, one_error):
    (tmp_path / "empty").mkdir()
    r = cli("train-teacher", "--arch", "resnet8", "--dataset", "fashion-mnist", "--data-dir", tmp_path / "empty",
            "--out", tmp_path / "r")
    one_error(r, r"fashion-mnist train files .* not found in .*empty.*drop --data-dir")


def test_missing_dataset_files(cli, tmp_path, one_error):
    r = cli("train-teacher", "--arch", "resnet8", "--dataset", "cifar100", "--data-dir", tmp_path, "--out", tmp_path / "r")
    one_error(r, r"cifar-100-python.*not found|not found.*--download")


def test_unwritable_out(cli, tmp_path, one_error):
    (tmp_path / "file").write_text("x")
    r = cli("train-teacher", "--arch", "resnet8", "--dataset", "synthetic", "--out", tmp_path / "file" / "sub")
    one_error(r, r"cannot write to --out")


def test_cuda_absent(cli, tmp_path, one_error):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    one_error(cli(*base_args(tmp_path, "--arch", "resnet8", "--device", "cuda")), r"no CUDA device")


def test_resume_with_other_arch_refused(cli, tmp_path, one_error):
    train_teacher(train_cfg(**SMALL, epochs=1, out=str(tmp_path / "r")))
    r = cli(*base_args(tmp_path, "--arch", "wrn_16_1", "--resume"))
    one_error(r, r"made with --arch 'resnet8', this run has 'wrn_16_1'")


def test_existing_run_without_resume_refused(cli, tmp_path, one_error):
    train_teacher(train_cfg(**SMALL, epochs=1, out=str(tmp_path / "r")))
    before = (tmp_path / "r" / "last.pth").read_bytes()
    one_error(cli(*base_args(tmp_path, "--arch", "resnet8")), r"already holds a run.*--resume")
    assert (tmp_path / "r" / "last.pth").read_bytes() == before  # finished work untouched


def test_garbage_checkpoint_refused(cli, tmp_path, one_error):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "last.pth").write_bytes(b"not a checkpoint at all")
    one_error(cli(*base_args(tmp_path, "--arch", "resnet8", "--resume")), r"not a readable torch checkpoint")
    torch.save({"weights": [1, 2]}, tmp_path / "r" / "last.pth")
    one_error(cli(*base_args(tmp_path, "--arch", "resnet8", "--resume")), r"not a camkd or reference checkpoint")


def test_cli_trains_and_prints_summary(cli, tmp_path):
    r = cli(*base_args(tmp_path, "--arch", "resnet8", "--limit", "128", "--batch-size", "32"))
    assert r.exit_code == 0, r.output
    assert "resnet8: best top-1" in r.output and (tmp_path / "r" / "best.pth").exists()


def test_truncated_checkpoint_says_so(cli, tmp_path, one_error):
    train_teacher(train_cfg(**SMALL, epochs=1, out=str(tmp_path / "r")))
    last = tmp_path / "r" / "last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut short
    one_error(cli(*base_args(tmp_path, "--arch", "resnet8", "--resume")),
              r"last\.pth is not a readable torch checkpoint \(it is truncated or corrupt: copy it again .*\); use another "
              r"checkpoint \(a run folder also has best\.pth\) or retrain$")


def test_limit_beyond_the_dataset_refused(cli, tmp_path, one_error):
    one_error(cli(*base_args(tmp_path, "--arch", "resnet8", "--limit", "5000")),
              r"--limit 5000 is more than the 1024 samples of synthetic's train split; give at most --limit 1024")
    assert not (tmp_path / "r").exists()


def test_empty_checkpoint_refused(cli, tmp_path, one_error):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "last.pth").write_bytes(b"")
    one_error(cli(*base_args(tmp_path, "--arch", "resnet8", "--resume")), r"is empty \(0 bytes\)")


def test_batch_larger_than_data_refused(cli, tmp_path, one_error):
    one_error(cli(*base_args(tmp_path, "--arch", "resnet8", "--limit", "1")), r"no step would run")


def test_missing_data_dir_is_not_silently_replaced(cli, tmp_path, one_error):
    r = cli("train-teacher", "--arch", "resnet8", "--dataset", "fashion-mnist", "--data-dir", tmp_path / "nope", "--out", tmp_path / "r")
    one_error(r, r"--data-dir .*nope does not exist")


def test_sync_bn_needs_cuda(cli, tmp_path, one_error):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    one_error(cli(*base_args(tmp_path, "--arch", "resnet8", "--sync-bn", "--device", "cpu")), r"--sync-bn needs CUDA")
    assert not (tmp_path / "r").exists()


def test_decay_epochs_repeated_or_comma_separated(cli, tmp_path):
    for i, args in enumerate([("--lr-decay-epochs", "1,2"), ("--lr-decay-epochs", "1", "--lr-decay-epochs", "2")]):
        out = tmp_path / f"d{i}"
        r = cli("train-teacher", "-m", "resnet8", "-d", "synthetic", "--limit", "64", "--batch-size", "32", "--epochs",
                "1", "--device", "cpu", "-q", "--out", out, *args)
        assert r.exit_code == 0, r.output
        assert load_checkpoint(out / "last.pth")["meta"]["options"]["optim"]["lr_decay_epochs"] == [1, 2]
