"""distill: the promise (cache == online, step by step, for every method), resume, bad input."""

import os

import numpy as np
import pytest
import torch
from configs import StepRecorder, distill_cfg
from helpers import two_teachers

from camkd.cache import CacheConfig, cache_teachers
from camkd.checkpoint import load_checkpoint
from camkd.distill import distill
from camkd.errors import CamkdError
from camkd.methods import list_methods

N = 128


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return two_teachers(tmp_path_factory.mktemp("teachers"), N)


@pytest.fixture(scope="module")
def stores(teachers, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for dtype in ("float32", "float16"):
        path = root / f"{dtype}.zarr"
        cache_teachers(CacheConfig(teachers=teachers, dataset="synthetic", options={"num_samples": N}, views=2, aug_seed=3,
                                   features=["penultimate", "hint:2"], dtype=dtype, batch_size=128, out=str(path), progress=False))
        out[dtype] = str(path)
    return out


def run(tmp_path, name, **kw):
    """A distillation run; the summary gets "steps": every step's losses (recorded by a hook)."""
    base = dict(arch="resnet8", epochs=6, batch_size=16, lr=0.02, seed=1, deterministic=True, progress=False,
                out=str(tmp_path / name))
    base.update(kw)
    rec = StepRecorder()
    s = distill(distill_cfg(**base), hooks=rec)
    s["steps"] = rec.table()
    return s


def final_weights(path):
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("method", sorted(list_methods()))
def test_cache_equals_online(method, teachers, stores, tmp_path):
    """2 epochs: both views, and epoch 2 with every term of every method (CA-MKD's feature term starts in 2)."""
    cached = run(tmp_path, "cached", method=method, cache=stores["float32"], epochs=2)
    online = run(tmp_path, "online", method=method, cache=stores["float32"], online=True, teachers=teachers, epochs=2)
    a = np.array([s["loss"] for s in cached["steps"]])
    b = np.array([s["loss"] for s in online["steps"]])
    assert len(a) == len(b) == 2 * (N // 16)  # drop-last batches
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-12)
    assert rel.max() <= 1e-5, (method, rel.max(), int(rel.argmax()))
    wa, wb = final_weights(tmp_path / "cached" / "last.pth"), final_weights(tmp_path / "online" / "last.pth")
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-4, atol=1e-5), (method, k)


def test_float16_store_within_1e3(teachers, stores, tmp_path):
    # lr 0 keeps the student fixed, so each step compares the loss from float16 targets with the loss
    # from live teachers on the same student and batch (with learning, tiny differences are amplified
    # by the training dynamics; the float32 test above covers trajectories)
    kw = dict(method="camkd", epochs=2, lr=0.0)
    cached = run(tmp_path, "cached16", cache=stores["float16"], **kw)
    online = run(tmp_path, "online16", cache=stores["float16"], online=True, teachers=teachers, **kw)
    a = np.array([s["loss"] for s in cached["steps"]])
    b = np.array([s["loss"] for s in online["steps"]])
    assert {s["epoch"] for s in cached["steps"]} == {1, 2}  # epoch 2 includes the feature term
    rel = np.abs(a - b) / np.abs(b)
    assert 0 < rel.max() <= 1e-3, rel.max()  # not identical (fp16 rounding), but within 1e-3


def test_streamed_features_equal_online(teachers, stores, tmp_path):
    # a tiny memory budget forces the streamed reader (blocks, windows, prefetch thread)
    kw = dict(method="camkd", epochs=2, feature_memory_mb=0.01, window_blocks=1)
    cached = run(tmp_path, "stream", cache=stores["float32"], **kw)
    online = run(tmp_path, "stream_online", cache=stores["float32"], online=True, teachers=teachers, **kw)
    a = np.array([s["loss"] for s in cached["steps"]])
    b = np.array([s["loss"] for s in online["steps"]])
    assert np.abs(a - b).max() / np.abs(b).max() <= 1e-5


def test_resume_is_bit_identical(stores, tmp_path):
    full = run(tmp_path, "full", method="camkd", cache=stores["float32"], epochs=3)
    run(tmp_path, "part", method="camkd", cache=stores["float32"], epochs=1)
    resumed = run(tmp_path, "part", method="camkd", cache=stores["float32"], epochs=3, resume=True)
    wa, wb = load_checkpoint(tmp_path / "full" / "last.pth"), load_checkpoint(tmp_path / "part" / "last.pth")
    for part in ("model", "method"):
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), (part, k)
    assert full["last_top1"] == resumed["last_top1"]


def test_learns_from_the_store(stores, tmp_path):
    s = run(tmp_path, "learn", method="avg", cache=stores["float16"], epochs=3, lr=0.05)
    assert s["best_top1"] > 40.0, s["best_top1"]  # 10 classes: chance is 10%


# ---- bad input ------------------------------------------------------------------------------------

def test_method_needs_missing_features(teachers, tmp_path):
    path = tmp_path / "logits_only.zarr"
    cache_teachers(CacheConfig(teachers=teachers, dataset="synthetic", options={"num_samples": N}, views=1, features=["none"],
                               out=str(path), progress=False))
    with pytest.raises(CamkdError, match=r"no 'penultimate' features.*--features penultimate"):
        run(tmp_path, "x", method="camkd", cache=str(path))
    with pytest.raises(CamkdError, match=r"no 'hint2' features.*--features hint:2"):
        run(tmp_path, "y", method="fitnet", cache=str(path))
    s = run(tmp_path, "z", method="camkd", beta=0.0, cache=str(path), epochs=1)  # beta 0: logits suffice
    assert len(s["steps"]) == N // 16


def test_store_for_other_data_refused(stores, tmp_path, cli, one_error):
    r = cli("distill", "--cache", stores["float32"], "--arch", "resnet8", "--dataset", "fashion-mnist", "--out", tmp_path / "o")
    one_error(r, "caches dataset 'synthetic'")


def test_not_a_store(tmp_path, cli, one_error):
    (tmp_path / "plain").mkdir()
    r = cli("distill", "--cache", tmp_path / "plain", "--arch", "resnet8", "--out", tmp_path / "o")
    one_error(r, "not a camkd store")


def test_nan_loss_stops_and_keeps_checkpoint(stores, tmp_path):
    from camkd.checkpoint import atomic_save

    run(tmp_path, "nan", method="kd", cache=stores["float32"], epochs=1)
    last = tmp_path / "nan" / "last.pth"
    ckpt = load_checkpoint(last)  # the momentum made infinite: epoch 2's first step sends the weights to inf
    for state in ckpt["optimizer"]["state"].values():
        state["momentum_buffer"].fill_(float("inf"))
    atomic_save(ckpt, last)
    before = last.read_bytes()
    with pytest.raises(CamkdError, match=r"loss became NaN or infinite in epoch 2"):
        run(tmp_path, "nan", method="kd", cache=stores["float32"], epochs=2, resume=True)
    assert last.read_bytes() == before


def test_unknown_method_lists_names(stores, tmp_path):
    with pytest.raises(CamkdError, match="unknown method 'foo'.*camkd"):
        run(tmp_path, "m", method="foo", cache=stores["float32"])


def test_batch_larger_than_store_refused(stores, tmp_path):
    with pytest.raises(CamkdError, match=rf"--batch-size 5000 is larger than the {N} training samples"):
        run(tmp_path, "b", method="kd", cache=stores["float16"], batch_size=5000)


def test_limit_with_a_store_refused(stores, tmp_path):
    with pytest.raises(CamkdError, match=r"--limit applies only to --online without --cache"):
        run(tmp_path, "l", method="kd", cache=stores["float16"], limit=100)


def test_failure_before_the_first_checkpoint_leaves_no_run_folder(stores, tmp_path):
    """Interrupted in epoch 1 of a new run: no folder; in epoch 2: epoch 1's checkpoint and metrics stay."""
    from camkd.job import Hooks

    def stop_in(epoch_to_stop):
        def on_step(epoch, losses):
            if epoch == epoch_to_stop:
                raise KeyboardInterrupt
        return Hooks(on_step=on_step)

    kw = dict(arch="resnet8", method="kd", cache=stores["float16"], epochs=2, batch_size=64, progress=False)
    with pytest.raises(KeyboardInterrupt):
        distill(distill_cfg(**kw, out=str(tmp_path / "first")), hooks=stop_in(1))
    assert not (tmp_path / "first").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made: kept, only camkd's files go
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        distill(distill_cfg(**kw, out=str(tmp_path / "mine")), hooks=stop_in(1))
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    with pytest.raises(KeyboardInterrupt):
        distill(distill_cfg(**kw, out=str(tmp_path / "second")), hooks=stop_in(2))
    assert (tmp_path / "second" / "last.pth").exists()
    assert len((tmp_path / "second" / "metrics.jsonl").read_text().splitlines()) == 1


def test_out_must_be_a_folder_of_its_own(stores, cli, tmp_path, one_error):
    """--out naming a store or a folder of runs is refused: the run would go inside the store / hide the runs."""
    base = ["distill", "-m", "resnet8", "-c", stores["float16"], "--method", "kd", "--epochs", "1", "--device", "cpu", "-q"]
    r = cli(*base, "--out", stores["float16"])
    one_error(r, r"^error: --out .*is a Zarr store, not a run folder")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "metrics.jsonl").write_text("")
    r = cli(*base, "--out", tmp_path / "runs")
    one_error(r, r"holds runs \(a\); give the run a folder of its own")
    r = cli(*base, "--aug-seed", "3", "--out", tmp_path / "t")
    one_error(r, "--aug-seed applies only to --online without --cache")
    assert not (tmp_path / "t").exists()
    r = cli(*base, "--kd-T", "-4", "--out", tmp_path / "t")
    one_error(r, r"^error: --kd-T must be > 0, got -4.0$")
    assert not (tmp_path / "t").exists()


def test_data_dir_does_not_apply_to_a_synthetic_store(cli, one_error, stores, tmp_path):
    r = cli("distill", "-m", "resnet8", "-c", stores["float16"], "--epochs", "1", "--device", "cpu", "-q",
            "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "t")
    one_error(r, r"^error: --data-dir does not apply to synthetic data \(it is generated, not read from files\); drop it$")
    assert not (tmp_path / "t").exists()


def test_loss_options_the_method_does_not_use_are_refused(cli, one_error, stores, tmp_path):
    """An option given explicitly that the method never reads is one error naming it and the methods that use it."""
    base = ["distill", "-m", "resnet8", "-c", stores["float16"], "--epochs", "1", "--device", "cpu", "-q", "--out",
            tmp_path / "t"]
    one_error(cli(*base, "--method", "avg", "--aekd-C", "2", "--hint-layer", "3", "-b", "7"),
              r"^error: -b/--beta \(used by camkd, fitnet\), --aekd-C \(used by aekd\) and --hint-layer \(used by fitnet\) "
              r"do nothing with --method avg; drop them or choose a method that uses them$")
    one_error(cli(*base, "--method", "ce", "--kd-T", "2"),
              r"^error: --kd-T \(used by aekd, avg, camkd, ebkd, fitnet, kd\) does nothing with --method ce; drop it")
    # bad values are named by their options, not LossConfig's fields
    one_error(cli(*base, "--method", "aekd", "--aekd-C", "0"), r"^error: --aekd-C must be > 0, got 0.0$")
    one_error(cli(*base, "--method", "ce", "-r", "-1"), r"^error: -r/--gamma must be >= 0, got -1.0$")
    assert not (tmp_path / "t").exists()


def test_evaluate_train_split_from_another_directory(stores, tmp_path, monkeypatch):
    """The checkpoint records the store's absolute path, so the run's training samples are found from anywhere."""
    from camkd.evaluate import evaluate_checkpoint

    rel = tmp_path / "w"
    rel.mkdir()
    monkeypatch.chdir(tmp_path)
    store_rel = os.path.relpath(stores["float16"], tmp_path)
    run(tmp_path, "rel", method="kd", cache=store_rel, epochs=1)
    monkeypatch.chdir(rel)
    r = evaluate_checkpoint(tmp_path / "rel" / "last.pth", split="train", device="cpu")
    assert r["samples"] == N


def test_resume_with_other_trajectory_options_refused(stores, tmp_path):
    """--resume refuses options that shaped the epochs already run; --epochs may grow, --micro-batches may change."""
    kw = dict(method="camkd", cache=stores["float16"], batch_size=64)
    run(tmp_path, "r", epochs=1, **kw)
    for change, flag in [({"lr": 0.5}, "--lr"), ({"seed": 7}, "--seed"), ({"kd_T": 2.0}, "--kd-T"), ({"beta": 1.0}, "--beta"),
                         ({"batch_size": 32}, "--batch-size")]:
        with pytest.raises(CamkdError, match=rf"--resume: .*last.pth was made with {flag} \S+, this run has"):
            run(tmp_path, "r", epochs=2, resume=True, **{**kw, **change})
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 1  # the refused resumes changed nothing
    s = run(tmp_path, "r", epochs=2, resume=True, micro_batches=2, **kw)
    assert [h["epoch"] for h in s["history"]][-1] == 2


def test_resume_mismatch_shows_the_difference(tmp_path):
    from camkd.runs import RunFolder

    (tmp_path / "r").mkdir()
    torch.save({"model": {}, "optimizer": {}, "meta": {"teachers": ["a" * 64, "b" * 64]}}, tmp_path / "r" / "last.pth")
    folder = RunFolder(tmp_path / "r", resume=True)
    with pytest.raises(CamkdError, match=r"other teachers \(from the --cache store, or from --teacher\) 2 entries .*, "
                                         r"this run has 1 entry"):
        folder.load_last({"teachers": ["a" * 64]})
    with pytest.raises(CamkdError, match=r"other teachers .* entry 2 'bbbbbbbbbbbb\.\.\.', this run has 'cccccccccccc\.\.\.';"):
        folder.load_last({"teachers": ["a" * 64, "c" * 64]})
