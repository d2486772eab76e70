"""`train-teacher --trial T` seeds the run unless --seed / --aug-seed are given (a run made before that resumes with the
seeds its checkpoint recorded), and the commands that use teachers refuse one teacher given twice: equal weights, or
checkpoints whose records say they were trained alike."""

import os

import pytest
import torch

SIZE = ("-d", "synthetic", "--image-size", "16", "--limit", "16", "--batch-size", "8", "--device", "cpu", "-q")


def _teacher(cli, out, *extra, epochs: int = 1):
    r = cli("train-teacher", "-m", "resnet8", *SIZE, "--epochs", str(epochs), "--out", out, *extra)
    assert r.exit_code == 0, r.output
    return torch.load(out / "last.pth", weights_only=False)


def _seeds(ckpt) -> tuple[int, int]:
    options = ckpt["meta"]["options"]
    return options["run"]["seed"], options["aug_seed"]


def _equal_weights(a, b) -> bool:
    return all(torch.equal(x, b["model"][k]) for k, x in a["model"].items())


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    """Trials 0 and 1 of one tiny teacher, --trial alone (their last.pth checkpoints, loaded, and their folders)."""
    from typer.testing import CliRunner

    from camkd.cli import app

    tmp = tmp_path_factory.mktemp("trials")

    def cli(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    folders = [tmp / f"trial_{t}" for t in (0, 1)]
    return [_teacher(cli, f, "--trial", str(t)) for t, f in enumerate(folders)], folders


def test_trials_seed_the_run(trials):
    (t0, t1), _ = trials
    assert _seeds(t0) == (0, 0) and _seeds(t1) == (1, 1)
    assert t0["meta"]["options"]["trial"] == 0 and t1["meta"]["options"]["trial"] == 1
    assert not _equal_weights(t0, t1)


def test_given_seeds_win_over_the_trial(cli, trials, tmp_path):
    (t0, _), _ = trials
    given = _teacher(cli, tmp_path / "a", "--trial", "1", "--seed", "0")  # --seed given: the trial only names the run
    assert _seeds(given) == (0, 0) and _equal_weights(given, t0)
    both = _teacher(cli, tmp_path / "b", "--trial", "1", "--seed", "3", "--aug-seed", "5")
    assert _seeds(both) == (3, 5)
    aug = _teacher(cli, tmp_path / "c", "--trial", "2", "--aug-seed", "7")  # the seed still the trial's
    assert _seeds(aug) == (2, 7)


def test_a_run_made_before_trials_seeded_resumes_with_its_seeds(cli, one_error, tmp_path):
    """A trial-1 run from before this change recorded seed 0 and aug seed 0: --resume without --seed continues it with
    them (equal to an uninterrupted seed-0 run), an explicit other --seed is refused."""
    old = tmp_path / "old"
    _teacher(cli, old, "--trial", "1", "--seed", "0")  # what the old default trained: the same record, the same numbers
    whole = _teacher(cli, tmp_path / "whole", "--trial", "1", "--seed", "0", epochs=2)
    one_error(cli("train-teacher", "-m", "resnet8", *SIZE, "--epochs", "2", "--out", old, "--trial", "1", "--resume",
                  "--seed", "1"), r"--resume: .*last.pth was made with --seed 0, this run has --seed 1")
    resumed = _teacher(cli, old, "--trial", "1", "--resume", epochs=2)
    assert _seeds(resumed) == (0, 0) and resumed["meta"]["epoch"] == 2
    assert _equal_weights(resumed, whole)


def test_a_new_run_resumes_with_its_trial_seed(cli, tmp_path):
    out = tmp_path / "r"
    _teacher(cli, out, "--trial", "3")
    resumed = _teacher(cli, out, "--trial", "3", "--resume", epochs=2)
    assert _seeds(resumed) == (3, 3) and resumed["meta"]["epoch"] == 2


def _cache(cli, tmp_path, *teachers):
    specs = [a for t in teachers for a in ("-t", t)]
    return cli("cache-teachers", *specs, "-d", "synthetic", "--image-size", "16", "--limit", "16", "-V", "1", "--no-eval",
               "--device", "cpu", "-q", "-o", tmp_path / "s.zarr")


def test_distinct_trials_are_cached(cli, trials, tmp_path):
    _, (f0, f1) = trials
    r = _cache(cli, tmp_path, f0 / "last.pth", f1 / "last.pth")
    assert r.exit_code == 0, r.output


def test_equal_weights_are_refused(cli, one_error, trials, tmp_path):
    """A copy of a teacher's weights under another name (a reference file: weights only, so another sha256) is the
    same teacher; so is the copy of its checkpoint with a changed record (another --out named in it)."""
    (t0, _), (f0, f1) = trials
    torch.save({"model": t0["model"], "epoch": 240}, tmp_path / "copy.pth")
    one_error(_cache(cli, tmp_path, f0 / "last.pth", f1 / "last.pth", f"resnet8={tmp_path / 'copy.pth'}"),
              rf"teachers 1 and 3 have equal weights \({f0 / 'last.pth'}, resnet8={tmp_path / 'copy.pth'}\).*another --trial")
    moved = dict(t0, meta={**t0["meta"], "options": {**t0["meta"]["options"], "trial": 5}})
    torch.save(moved, tmp_path / "moved.pth")
    one_error(_cache(cli, tmp_path, f0 / "last.pth", tmp_path / "moved.pth"), r"teachers 1 and 2 have equal weights")
    assert sorted(os.listdir(tmp_path)) == ["copy.pth", "moved.pth"]  # no store left behind


def test_teachers_trained_alike_are_refused(cli, one_error, trials, tmp_path):
    """Weights that differ (a device's nondeterminism, say) under records of one training: refused, named; a
    reference checkpoint (no record) with those weights is not compared by record."""
    (t0, _), (f0, _) = trials
    other = {k: v.clone() for k, v in t0["model"].items()}
    next(v for v in other.values() if v.is_floating_point()).add_(1e-3)
    torch.save(dict(t0, model=other), tmp_path / "rerun.pth")
    one_error(_cache(cli, tmp_path, f0 / "last.pth", tmp_path / "rerun.pth"),
              rf"teachers 1 and 2 were trained alike \({f0 / 'last.pth'}, {tmp_path / 'rerun.pth'}: resnet8 .*--seed 0 "
              r"--aug-seed 0 .*epoch 1.*another --trial")
    assert sorted(os.listdir(tmp_path)) == ["rerun.pth"]
    torch.save({"model": other}, tmp_path / "reference.pth")
    r = _cache(cli, tmp_path, f0 / "last.pth", f"resnet8={tmp_path / 'reference.pth'}")
    assert r.exit_code == 0, r.output


def test_online_distillation_refuses_equal_teachers(cli, one_error, trials, tmp_path):
    (t0, _), (f0, _) = trials
    torch.save({"model": t0["model"]}, tmp_path / "copy.pth")
    one_error(cli("distill", "-m", "resnet8", "--online", "-t", f0 / "last.pth", "-t", f"resnet8={tmp_path / 'copy.pth'}",
                  "-d", "synthetic", "--image-size", "16", "--limit", "16", "--epochs", "1", "--batch-size", "8",
                  "--device", "cpu", "-q", "--out", tmp_path / "student"), r"teachers 1 and 2 have equal weights")
    assert sorted(os.listdir(tmp_path)) == ["copy.pth"]


def test_a_store_made_before_from_alike_trials_stays_usable(cli, trials, tmp_path):
    """A store an earlier camkd made from trials that were trained alike (the old --trial default: equal weights) is
    extended and distilled --online from as before: the distinctness check is for new stores only (the store's own
    identity is compared when it is continued). The old store is made here by the writer itself, without the check."""
    from camkd import dist
    from camkd.data import load_split
    from camkd.precision import Precision
    from camkd.store.config import CacheConfig, check_options
    from camkd.store.writer import write_store
    from camkd.teachers import feature_shapes, load_teachers, runner

    (t0, _), (f0, _) = trials
    torch.save({**t0, "meta": {**t0["meta"], "options": {**t0["meta"]["options"], "trial": 2}}}, tmp_path / "t2.pth")
    specs = [str(f0 / "last.pth"), str(tmp_path / "t2.pth")]  # equal weights, the records of one training
    out = tmp_path / "old.zarr"
    cfg = CacheConfig(teachers=specs, dataset="synthetic", options={"image_size": 16}, limit=16, views=1, features=["none"],
                      device="cpu", out=str(out), progress=False, evaluate=False)
    cpu = torch.device("cpu")
    layers = check_options(cfg)
    teachers = load_teachers(specs, device=cpu, distinct=False)
    train = load_split("synthetic", "train", limit=16, image_size=16)
    write_store(cfg, runner(teachers, cpu, Precision.of("fp32", cpu)), train, layers, feature_shapes(teachers, train, layers, cpu),
                16, dist.current(), lambda: None)
    r = cli("cache-teachers", "-t", specs[0], "-t", specs[1], "-d", "synthetic", "--image-size", "16", "--limit", "16",
            "-V", "2", "-f", "none", "--no-eval", "--device", "cpu", "-q", "-o", out)
    assert r.exit_code == 0, r.output
    r = cli("distill", "-m", "resnet8", "--method", "avg", "-c", out, "--online", "-t", specs[0], "-t", specs[1], "--epochs",
            "1", "--batch-size", "8", "--device", "cpu", "-q", "--out", tmp_path / "student")
    assert r.exit_code == 0, r.output


def test_a_run_from_before_a_default_changed_resumes_with_its_numbers(cli, tmp_path):
    """train-teacher --resume without --lr continues with the lr the checkpoint recorded, also when today's default
    differs (the small-lr rule now covers more archs): not refused as another --lr."""
    out = tmp_path / "r"
    ckpt = _teacher(cli, out, "--trial", "0")
    ckpt["meta"]["options"]["optim"]["lr"] = 0.07  # what an earlier default gave
    torch.save(ckpt, out / "last.pth")
    resumed = _teacher(cli, out, "--trial", "0", "--resume", epochs=2)
    assert resumed["meta"]["epoch"] == 2 and resumed["meta"]["options"]["optim"]["lr"] == 0.07
