"""Stores of image folders and distillation from them: boxes, pixel CRC-32s and the file listing are stored,
cached == online, changed files and other decoders are named, resume after kill -9 or Ctrl-C, 2 ranks, --limit,
--dry-run.

The tests use small folders (tests/folder_helpers.py), two resnet8 teachers trained once per module at --image-size 32.
"""

import shutil

import numpy as np
import pytest
import torch
from configs import StepRecorder, distill_cfg
from folder_helpers import CLASSES, SIZE

from camkd.checkpoint import load_checkpoint
from camkd.data import load_dataset
from camkd.data.norm import normalize
from camkd.distill import distill


def _cache_args(folder, store, *teachers, views: int = 2):
    return ("cache-teachers", *[a for t in teachers for a in ("-t", t)], "--dataset", "imagefolder", "--data-dir", folder,
            "--image-size", SIZE, "--workers", "0", "--views", str(views), "--dtype", "float32", "--batch-size", "8",
            "--out", store, "-q")


@pytest.fixture(scope="module")
def store(tmp_path_factory, folder):
    """Two resnet8 teachers trained 1 epoch on the folder at lr 0.05, cached over 2 views.

    Not the folder recipe's lr (0.1 x 8 / 256): its near-uniform teachers give kd losses so small that, at 2 threads,
    the cached and online runs' float rounding grew to 2e-4 (relative) within 5 steps, past cache == online's 1e-5."""
    from typer.testing import CliRunner

    from camkd.cli import app

    tmp = tmp_path_factory.mktemp("folder_store")
    teachers = []
    for seed in (0, 1):
        out = tmp / f"t{seed}"
        r = CliRunner().invoke(app, ["train-teacher", "--arch", "resnet8", "--dataset", "imagefolder", "--data-dir", str(folder),
                                     "--image-size", SIZE, "--workers", "0", "--epochs", "1", "--batch-size", "8",
                                     "--lr", "0.05", "--seed", str(seed), "--out", str(out), "-q"])
        assert r.exit_code == 0, r.output
        teachers.append(str(out / "last.pth"))
    path = tmp / "store.zarr"
    r = CliRunner().invoke(app, [str(a) for a in _cache_args(folder, path, *teachers)])
    assert r.exit_code == 0, r.output
    return {"path": path, "teachers": teachers}


def _distill(tmp_path, name, folder, **kw):
    base = dict(arch="resnet8", method="camkd", epochs=2, batch_size=8, lr=0.02, seed=1, deterministic=True,
                progress=False, out=str(tmp_path / name), data_dir=str(folder), options={"workers": 0})
    base.update(kw)
    hooks = base.pop("hooks", None)
    return distill(distill_cfg(**base), hooks=hooks)


def test_store_keeps_boxes_pixels_files_and_decoder(store, folder):
    import zarr

    from camkd.data.decode import decoder_versions

    g = zarr.open_group(store["path"], mode="r")  # plain zarr reads it
    attrs = g.attrs["camkd"]
    assert attrs["data_kind"] == "files" and attrs["decoder_versions"] == decoder_versions()
    train = load_dataset("imagefolder", "train", data_dir=folder, image_size=32, workers=0)
    assert list(g["files/path"][:]) == list(train.listing.paths)
    assert np.array_equal(g["files/size"][:], train.listing.sizes) and np.array_equal(g["files/label"][:], train.listing.labels)
    aug, pixels = g["aug"][:], g["pixels"][:]
    assert aug.shape == (2, 24, 5) and aug.dtype == np.int32 and pixels.shape == (2, 24) and pixels.dtype == np.uint32
    x, params, hashes = next(train.view_batches(train.aug_spec(0), 1, [np.arange(24)], torch.device("cpu")))
    assert np.array_equal(aug[1], params.numpy()) and np.array_equal(pixels[1], hashes)


def test_cached_equals_online_on_a_folder(store, folder, tmp_path):
    """The same loop fed from the store and from live teachers on the same decoded views (kd: logits; CA-MKD's feature
    term at beta 50 on these 1-epoch teachers amplifies float rounding past any fixed tolerance within 6 steps)."""
    steps = []
    for name, kw in (("cached", {}), ("online", {"online": True, "teachers": store["teachers"]})):
        rec = StepRecorder()
        _distill(tmp_path, name, folder, method="kd", cache=str(store["path"]), hooks=rec, **kw)
        steps.append(np.array([s["loss"] for s in rec.table()]))
    assert len(steps[0]) == len(steps[1]) == 2 * 3  # 2 epochs of 24 // 8 batches
    assert (np.abs(steps[0] - steps[1]) / np.abs(steps[1])).max() <= 1e-5
    wa = load_checkpoint(tmp_path / "cached" / "last.pth")["model"]
    wb = load_checkpoint(tmp_path / "online" / "last.pth")["model"]
    for k in wa:  # the tolerance of tests/test_distill.py's cache == online
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-4, atol=1e-5), k


def test_camkd_cached_equals_online_on_a_folder(store, folder, tmp_path):
    """CA-MKD (every term, the feature term at beta 50 from epoch 2): cached == online step by step with the student held
    fixed (lr 0), after proving that the two runs' teacher outputs differ only in the teachers' last GEMM's rounding.

    The proof (first half): the live teachers' features equal the stored ones bit for bit in any batch, and their
    logits do too when a batch is one the cache ran (the stored order, --batch-size 8); in the epoch's shuffled
    batches the logits may differ by a few float32 ulp (whether they do depends on the CPU's sgemm kernel: on some
    they are equal, so neither is asserted). The conv and BatchNorm layers give a sample the same result
    anywhere in a batch of this size (measured: also at batch 24; not at batch 1, where another conv kernel runs); the
    final Linear (an sgemm) does not: a row's accumulation order depends on its place in the batch's matrix
    (measured: every earlier layer bit-identical, the fc's output 3e-8 apart). That is float non-associativity,
    not a camkd difference: the pixels are proven equal (CRC-32s), the features and heads are the same bytes.

    Why lr 0 and not a learning trajectory at 1e-5 as for kd above: CA-MKD's teacher weights (a softmax over the
    teachers' cross-entropies) and its feature term (beta 50) feed those ulps back through learning; measured on this
    fixture, six learning steps took them to 1e-6 (1 thread) and 7e-6 (2 threads) relative in the loss and 24-34x past
    allclose(rtol 1e-4, atol 1e-5) in the weights, growing with every step. With lr 0 each step compares the loss
    from the store with the loss from live teachers on the same student and batch, so ulp-level inputs must give
    losses within 1e-5 (relative), every term, both epochs; a wrong feature, head, weight or view gives far more."""
    from camkd.data.order import epoch_order
    from camkd.store import open_store
    from camkd.teachers import load_teachers, run_teachers

    st = open_store(store["path"])
    layers = {layer: -2 if layer == "penultimate" else int(layer[4:]) for layer in st.layers}
    assert "penultimate" in layers and st.feature_dtype == "float32"
    train = load_dataset("imagefolder", "train", data_dir=folder, image_size=32, workers=0)
    spec, teachers, stored = train.aug_spec(0), load_teachers(store["teachers"]), st.logits(0).float()
    cache_batches = [np.arange(s, s + 8) for s in range(0, 24, 8)]
    shuffled = [w[s : s + 8] for w in epoch_order(24, seed=1, epoch=1, block_rows=st.block_rows, window_blocks=None)
                for s in range(0, len(w), 8)]
    for batches, exact_logits in ((cache_batches, True), (shuffled, False)):
        for idx, (x, _, _) in zip(batches, train.view_batches(spec, 0, batches, torch.device("cpu")), strict=True):
            logits, feats = run_teachers(teachers, normalize(x, spec.norm), layers)
            for layer in layers:
                for t, f in enumerate(st.features(layer, 0)):
                    assert torch.equal(feats[layer][t], torch.from_numpy(f[idx])), (layer, t)
            if exact_logits:
                assert torch.equal(logits, stored[idx])
            else:  # a few ulp of float32 (2**-23 relative)
                assert torch.allclose(logits, stored[idx], rtol=2**-20, atol=2**-20)
    steps = []
    for name, kw in (("cached", {}), ("online", {"online": True, "teachers": store["teachers"]})):
        rec = StepRecorder()
        _distill(tmp_path, name, folder, method="camkd", lr=0.0, cache=str(store["path"]), hooks=rec, **kw)
        steps.append(rec.table())
    assert len(steps[0]) == len(steps[1]) == 2 * 3 and {s["epoch"] for s in steps[0]} == {1, 2}
    terms = [k for k in steps[0][0] if k not in ("epoch", "step")]
    assert {"loss", "ce", "kd", "inter"} <= set(terms)
    for a, b in zip(*steps):
        for k in terms:
            assert abs(a[k] - b[k]) <= 1e-5 * abs(b[k]), (a["epoch"], k, a[k], b[k])
    assert steps[0][-1]["inter"] > 0  # the feature term is in epoch 2


def test_cached_equals_online_with_torchvision_teacher_and_student(folder, tmp_path):
    """A torchvision teacher (its own state_dict file: what torchvision ships) cached over a folder, and a torchvision
    student distilled from the store and with the teacher live: the same losses step by step, the same weights."""
    import torchvision

    from camkd.cache import CacheConfig, cache_teachers

    torch.manual_seed(3)
    teacher = torchvision.models.get_model("shufflenet_v2_x0_5", weights=None, num_classes=len(CLASSES))
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    spec = f"tv:shufflenet_v2_x0_5={tmp_path / 'teacher.pth'}"
    path = tmp_path / "tv.zarr"
    cache_teachers(CacheConfig(teachers=[spec], dataset="imagefolder", data_dir=str(folder), views=1, dtype="float32",
                               features=["none"], batch_size=8, device="cpu", out=str(path), progress=False, evaluate=False,
                               options={"image_size": 32, "workers": 0}))
    steps = []
    for name, kw in (("cached", {}), ("online", {"online": True, "teachers": [spec]})):
        rec = StepRecorder()
        _distill(tmp_path, name, folder, arch="tv:resnet18", method="avg", epochs=1, cache=str(path), hooks=rec, **kw)
        steps.append(np.array([s["loss"] for s in rec.table()]))
    assert len(steps[0]) == len(steps[1]) == 3
    assert (np.abs(steps[0] - steps[1]) / np.abs(steps[1])).max() <= 1e-5
    wa = load_checkpoint(tmp_path / "cached" / "last.pth")["model"]
    wb = load_checkpoint(tmp_path / "online" / "last.pth")["model"]
    for k in wa:  # the tolerance of tests/test_distill.py's cache == online
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-4, atol=1e-5), k


def test_changed_folder_is_refused_naming_the_file(cli, one_error, store, folder, tmp_path):
    args = ("distill", "--arch", "resnet8", "--cache", store["path"], "--workers", "0", "--epochs", "1", "--batch-size", "8",
            "--device", "cpu", "--out", tmp_path / "s")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    one_error(cli(*args, "--data-dir", copy, "--image-size", SIZE), r"--image-size applies only to --online")
    shutil.copy(copy / "train" / "ant" / "ant_00.jpg", copy / "train" / "ant" / "ant_99.jpg")
    one_error(cli(*args, "--data-dir", copy), r"train/ant/ant_99\.jpg was added")
    (copy / "train" / "ant" / "ant_99.jpg").unlink()
    (copy / "train" / "bee" / "bee_01.jpg").unlink()
    one_error(cli(*args, "--data-dir", copy), r"train/bee/bee_01\.jpg was removed")
    shutil.copy(copy / "train" / "cat" / "cat_00.jpg", copy / "train" / "bee" / "bee_01.jpg")
    one_error(cli(*args, "--data-dir", copy), r"train/bee/bee_01\.jpg was replaced")
    shutil.copy(folder / "train" / "bee" / "bee_01.jpg", copy / "train" / "bee" / "bee_01.jpg")  # the folder as cached
    last = sorted((copy / "train").iterdir())[-1]
    shutil.copy(copy / "train" / "ant" / "ant_00.jpg", last / "zz_last.jpg")  # after every recorded file in path order
    one_error(cli(*args, "--data-dir", copy), rf"1 file of .* was added since the store was written from the whole "
              rf"folder \(first: train/{last.name}/zz_last\.jpg\), so the store would leave them out")
    assert not (tmp_path / "s").exists()


def test_other_pixels_stop_distillation_naming_the_file(cli, one_error, store, folder, tmp_path, monkeypatch):
    """Another decoder, simulated: one file's views come out one level brighter in one pixel."""
    from camkd.data import folder as folder_module

    real = folder_module.train_view_into

    def other_decoder(img, box, flip, size, out):
        real(img, box, flip, size, out)
        if img.filename.endswith("cat_03.jpg"):
            out[0, 0, 0] ^= 1
        return out

    import camkd.sources

    monkeypatch.setattr(folder_module, "train_view_into", other_decoder)
    monkeypatch.setattr(camkd.sources, "decoder_versions", lambda: {"decoder": "pillow-rgb+crop+bilinear", "pillow": "0.0"})
    line = one_error(cli("distill", "--arch", "resnet8", "--cache", store["path"], "--data-dir", folder, "--workers", "0",
                         "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", tmp_path / "s"),
                     r"pixels of train/cat/cat_03\.jpg in view 0 differ")
    assert "the store's decoder: decoder pillow" in line and "this machine's: decoder pillow-rgb+crop+bilinear, pillow 0.0" in line
    r = cli("cache-verify", store["path"], *[a for t in store["teachers"] for a in ("-t", t)], "--data-dir", folder)
    assert r.exit_code != 0 and "MISMATCH: pixels of view" in r.output and "cat_03.jpg" in r.output, r.output


def test_a_file_rewritten_with_the_same_size_is_named(cli, one_error, store, folder, tmp_path):
    """The listing sees sizes only; the pixel hashes catch other content of the same size (same decoder here)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    path = copy / "train" / "cat" / "cat_03.jpg"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55  # inside the entropy-coded data: other pixels, same size
    path.write_bytes(bytes(data))
    one_error(cli("distill", "--arch", "resnet8", "--cache", store["path"], "--data-dir", copy, "--workers", "0",
                  "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", tmp_path / "s"),
              r"pixels of train/cat/cat_03\.jpg in view 0 differ .*the store's versions .*so the file's content changed")


def test_cache_verify_recomputes_from_the_files(cli, store, folder):
    r = cli("cache-verify", store["path"], *[a for t in store["teachers"] for a in ("-t", t)], "--data-dir", folder)
    assert r.exit_code == 0, r.output
    assert "match the stored CRC-32s" in r.output and "verdict: OK" in r.output


# ---- interrupted and resumed, many ranks, --limit ------------------------------------------------

def _tree(root) -> dict:
    """Every file of a store, by relative path: two stores are byte-identical when these are equal."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _flags(path):
    import zarr

    try:
        return np.asarray(zarr.open_array(str(path / "progress"), mode="r")[...])
    except Exception:  # not created yet
        return None


def test_cache_killed_while_writing_resumes_byte_identical(cli, store, folder, tmp_path):
    """kill -9 of cache-teachers over files once some (view, block) units are flagged; the rerun completes the store
    byte for byte as one uninterrupted run writes it (files/path strings, boxes and CRC-32s included)."""
    import os
    import subprocess
    import sys

    from helpers import kill_while_writing

    views = 8
    whole = tmp_path / "whole.zarr"
    assert cli(*_cache_args(folder, whole, *store["teachers"], views=views)).exit_code == 0
    cmd = [sys.executable, "-m", "camkd.cli", *map(str, _cache_args(folder, "OUT", *store["teachers"], views=views))]

    def start(attempt: int):
        killed = tmp_path / f"killed{attempt}.zarr"
        proc = subprocess.Popen([str(killed) if a == "OUT" else a for a in cmd], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
        return proc, killed

    _, killed, _ = kill_while_writing(start, _flags, attempts=3)
    r = cli(*_cache_args(folder, killed, *store["teachers"], views=views))
    assert r.exit_code == 0 and "resuming" in r.output, r.output
    assert _tree(killed) == _tree(whole)


def test_cache_interrupted_while_creating_resumes_byte_identical(cli, store, folder, tmp_path, interrupted_creation):
    """Stopped while creating the arrays (the file listing's among them): the same command goes on to the same bytes."""
    out = tmp_path / "s.zarr"
    assert cli(*_cache_args(folder, out, *store["teachers"])).exit_code == 130
    interrupted_creation.restore()
    r = cli(*_cache_args(folder, out, *store["teachers"]))
    assert r.exit_code == 0, r.output
    assert _tree(out) == _tree(store["path"])


def _same_weights(a, b) -> None:
    wa, wb = load_checkpoint(a), load_checkpoint(b)
    for part in ("model", "method"):
        assert wa[part].keys() == wb[part].keys()
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), (part, k)


def test_distill_interrupted_and_resumed_equals_uninterrupted(store, folder, tmp_path):
    """Stopped (as by Ctrl-C) in epoch 2 of a run from a folder store, then --resume: the weights of one whole run."""
    from camkd.job import Hooks

    def stop_in_epoch_2(epoch, losses):
        if epoch == 2:
            raise KeyboardInterrupt

    kw = dict(method="camkd", cache=str(store["path"]), epochs=3)
    _distill(tmp_path, "whole", folder, **kw)
    with pytest.raises(KeyboardInterrupt):
        _distill(tmp_path, "resumed", folder, hooks=Hooks(on_step=stop_in_epoch_2), **kw)
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 1
    _distill(tmp_path, "resumed", folder, resume=True, **kw)
    _same_weights(tmp_path / "whole" / "last.pth", tmp_path / "resumed" / "last.pth")


def test_two_ranks_equal_one_process_with_two_micro_batches(store, folder, tmp_path):
    """torchrun's 2 ranks (gloo) distilling from a folder store, each decoding its slice of every batch, == one process
    with --micro-batches 2, bit for bit."""
    from test_dist import VENV_BIN, assert_same_weights, one_process, torchrun

    base = ["distill", "-m", "resnet8", "-c", store["path"], "--data-dir", folder, "--workers", "0", "--method", "camkd",
            "--batch-size", "8", "--epochs", "2", "--lr", "0.02", "--seed", "3", "--deterministic", "--device", "cpu", "-q"]
    r = torchrun("--no-python", VENV_BIN / "camkd", *base, "--out", tmp_path / "w2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = one_process(VENV_BIN / "camkd", *base, "--micro-batches", "2", "--out", tmp_path / "m2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(tmp_path / "w2" / "last.pth", tmp_path / "m2" / "last.pth")


def test_a_limited_store_compares_only_its_files(cli, one_error, store, folder, tmp_path):
    """A store of the first 12 files (--limit 12: ant_00-07, bee_00-03): files after them may change; a change among
    them is named, and nothing after them is."""
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    limited = tmp_path / "limited.zarr"
    r = cli(*_cache_args(copy, limited, *store["teachers"]), "--limit", "12")
    assert r.exit_code == 0, r.output
    shutil.copy(copy / "train" / "ant" / "ant_00.jpg", copy / "train" / "cat" / "cat_99.jpg")  # added after the 12
    (copy / "train" / "cat" / "cat_00.jpg").write_bytes(b"not the same file")  # replaced after the 12
    args = ("distill", "--arch", "resnet8", "--cache", limited, "--data-dir", copy, "--workers", "0", "--epochs", "1",
            "--batch-size", "4", "--device", "cpu", "-q")
    r = cli(*args, "--out", tmp_path / "ok")
    assert r.exit_code == 0, r.output
    shutil.copy(copy / "train" / "cat" / "cat_01.jpg", copy / "train" / "bee" / "bee_01.jpg")  # replaced among the 12
    line = one_error(cli(*args, "--out", tmp_path / "no"), r"the first 12 files of .* changed since the store was "
                     r"written: train/bee/bee_01\.jpg was replaced \(\d+ bytes then, \d+ now\); restore")
    assert "cat" not in line.split("written:")[1]
    shutil.copy(copy / "train" / "ant" / "ant_00.jpg", copy / "train" / "ant" / "ant_05b.jpg")  # added among the 12
    one_error(cli(*args, "--out", tmp_path / "no"), r"written: train/ant/ant_05b\.jpg was added \(and 1 other change: "
              r"1 replaced\); so train/\w+/\w+\.jpg is no longer among the first 12 files; restore")


def test_dry_run_plans_without_reading_an_image(cli, store, tmp_path):
    """--dry-run lists the folder (names and byte sizes) and plans from it: 2,100 files that no decoder could read
    give the plan, and nothing is written."""
    root = tmp_path / "big"
    for split, n in (("train", 2100), ("val", 3)):
        for i in range(n):
            d = root / split / CLASSES[i % 3]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:05d}.jpg").write_bytes(b"not an image")
    out = tmp_path / "s.zarr"
    r = cli("cache-teachers", "-t", store["teachers"][0], "--dataset", "imagefolder", "--data-dir", root, "--image-size",
            "224", "--views", "100", "--logits", "topk:2", "--out", out, "--dry-run", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "planned store: 100 views x 2100 samples" in r.output and "files/*" in r.output and "pixels" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]


def test_a_store_cut_short_by_a_bad_file_says_the_folder_changed(cli, one_error, store, folder, tmp_path):
    """A decode error leaves a partial store; once the bad file is gone the folder holds one file fewer, and the rerun
    says so (not '--limit', which was never given)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    shutil.copy(__file__, copy / "train" / "ant" / "ant_zz.jpg")  # not an image, listed last of ant/
    path = tmp_path / "s.zarr"
    one_error(cli(*_cache_args(copy, path, *store["teachers"])), r"cannot decode .*ant_zz\.jpg")
    assert path.exists()  # the part already written is kept for a rerun
    (copy / "train" / "ant" / "ant_zz.jpg").unlink()
    line = one_error(cli(*_cache_args(copy, path, *store["teachers"])),
                     r"made differently: the store was started from the \d+ files the folder held then, it holds \d+ now: "
                     r"the folder changed since the store was started")
    assert "--limit" not in line


def test_cache_verify_names_data_dir_for_a_folder_store(cli, one_error, store):
    line = one_error(cli("cache-verify", store["path"], *[a for t in store["teachers"] for a in ("-t", t)]),
                     r"was cached from imagefolder image files: give --data-dir")
    assert "--dataset" not in line
