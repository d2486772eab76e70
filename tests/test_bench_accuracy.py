"""`camkd bench accuracy` protocols: content-addressed reuse, resume, and the analyses' arithmetic.

Tiny synthetic data (256 images of 16 px), 1 teacher epoch, 2 student epochs; no accuracy is asserted.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from camkd.bench import accuracy as A
from camkd.bench.common import cpu_model
from camkd.bench.teachers import decay_schedule, finished, history, teacher_identity
from camkd.output import write_result


def small(root, **kw) -> A.AccuracyConfig:
    base = dict(protocol="equal", dataset="synthetic", data_options={"num_samples": 256, "image_size": 16}, limit=None,
                teacher_archs=["resnet8", "resnet14", "wrn_16_1"], teacher_epochs=1, teacher_batch_size=32, weak_limit=64,
                epochs=2, seeds=[0, 1], batch_size=32, methods=["ce", "avg", "camkd"], device="cpu", root=str(root))
    base.update(kw)
    return A.AccuracyConfig(**base)


@pytest.fixture(scope="module")
def equal_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("acc")
    return root, A.run_accuracy(small(root))


def test_first_run_makes_everything_and_reports(equal_run, tmp_path):
    root, r = equal_run
    assert len(r["work"]["teachers"]) == 3 and len(r["work"]["stores"]) == 1
    assert len(r["work"]["students"]) == 7  # 3 methods x 2 seeds + camkd --online
    assert set(r["table"]) == {"ce", "avg", "camkd", "camkd --online"}
    for name, row in r["table"].items():
        assert len(row["runs"]) == (1 if "online" in name else 2)
        assert all(len(c) == 2 for c in r["curves"][name])  # one test accuracy per epoch
    p = r["paired"]["camkd - avg"]
    assert p["diffs"] == pytest.approx([c - a for c, a in zip(r["table"]["camkd"]["runs"], r["table"]["avg"]["runs"])])
    assert "camkd - kd" not in r["paired"]  # kd not run
    assert r["cache_vs_online"]["abs_diff"] < 1e-9  # float32 store: the same student either way
    tt = r["teacher_test"]
    assert len(tt["top1"]) == 3 and tt["disagreement"][0][0] == 0.0 and tt["disagreement"][0][1] == tt["disagreement"][1][0]
    assert math.isclose(tt["all_right"] + tt["some_wrong_some_right"] + tt["all_wrong"], 1.0)
    assert len(r["weights_store_view0"]) == 3 and set(r["weights_logged"]) == {"avg", "camkd", "camkd --online"}  # ce has none
    inter = r["inter_weights_logged"]["camkd"]  # the feature level's weights: none in epoch 1, a share per teacher after
    assert set(r["inter_weights_logged"]) == {"camkd", "camkd --online"} and inter[0] is None
    assert len(inter[1]) == 3 and math.isclose(sum(inter[1]), 1.0, rel_tol=1e-4)
    for f in (root / "teachers").iterdir():  # folders named ARCH-HASH, each a finished run
        assert f.name.split("-")[0] in ("resnet8", "resnet14", "wrn_16_1") and finished(f, 1)
    assert r["device"] == {"type": "cpu", "cpu": cpu_model(), "threads": [torch.get_num_threads()]}
    files = write_result(r, tmp_path / "res" / "equal", A.to_markdown(r), A.plot(r))
    assert json.loads((tmp_path / "res" / "equal.json").read_text())["protocol"] == "equal"
    md = (tmp_path / "res" / "equal.md").read_text()
    assert "| camkd - avg |" in md and "| camkd |" in md and "disagreement" in md and "feature level (inter_weights)" in md
    assert f"; CPU ({cpu_model()}, " in md.splitlines()[0]
    from PIL import Image

    assert Image.open(files[2]).size[0] > 300


def test_rerun_trains_nothing_and_added_method_only_its_students(equal_run):
    root, r = equal_run
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.pth")}
    again = A.run_accuracy(small(root))
    assert again["work"] == {"teachers": [], "stores": [], "students": []}
    assert again["table"] == r["table"]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.pth")} == mtimes  # not a checkpoint rewritten
    more = A.run_accuracy(small(root, methods=["ce", "avg", "camkd", "kd"]))
    assert more["work"]["teachers"] == [] and more["work"]["stores"] == []
    assert sorted(more["work"]["students"]) == sorted(f for f in more["work"]["students"] if f.startswith("kd-s"))
    assert len(more["work"]["students"]) == 2 and "camkd - kd" in more["paired"]


def test_unequal_reuses_the_strong_teacher(equal_run):
    root, r = equal_run
    u = A.run_accuracy(small(root, protocol="unequal", methods=["camkd"], seeds=[0], online=False))
    assert [t["role"] for t in u["teachers"]] == ["strong", "weak", "noisy"]
    assert u["teachers"][0]["folder"] == r["teachers"][0]["folder"]  # the same spec: the same folder
    assert u["teachers"][0]["sha256"] == r["teachers"][0]["sha256"]
    assert len(u["work"]["teachers"]) == 2 and len(u["work"]["stores"]) == 1  # weak and noisy only
    assert u["teachers"][1]["train_images"] == 64 and u["teachers"][2]["label_noise"] == 0.4
    noisy = torch.load(f"{u['teachers'][2]['folder']}/last.pth", weights_only=True)["meta"]
    assert noisy["label_noise"]["rate"] == 0.4 and noisy["label_noise"]["changed"] == round(0.4 * 256)
    w = u["weights_store_view0"][2]
    assert w["n_corrupted"] == round(0.4 * 256)  # the student's samples are the noisy teacher's (all 256)


def test_interrupted_student_resumes(equal_run, monkeypatch):
    root, r = equal_run
    import camkd.distill
    from camkd.job import Hooks

    victim = next(p for p in (root / "students").iterdir() if p.name.startswith("avg-s1-"))
    before = [rec["test_top1"] for rec in history(victim)]
    shutil.rmtree(victim)
    real = camkd.distill.distill
    calls = []

    def boom(epoch, losses):
        if epoch == 2:
            raise KeyboardInterrupt  # killed in epoch 2: epoch 1's checkpoint and metrics are on disk

    def interrupted(cfg, hooks=None):
        calls.append(cfg.run.out)
        return real(cfg, hooks=Hooks(on_step=boom))

    monkeypatch.setattr(camkd.distill, "distill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        A.run_accuracy(small(root))
    assert len(calls) == 1 and [rec["epoch"] for rec in history(victim)] == [1] and not finished(victim, 2)
    marked = dict(history(victim)[0], marker=1)  # kept by a resume (lines up to the checkpoint's epoch), lost by a restart
    (victim / "metrics.jsonl").write_text(json.dumps(marked) + "\n")
    monkeypatch.setattr(camkd.distill, "distill", real)
    again = A.run_accuracy(small(root))
    assert again["work"]["students"] == [victim.name]  # only the interrupted one ran, and resumed
    assert [rec["epoch"] for rec in history(victim)] == [1, 2]
    assert [rec["test_top1"] for rec in history(victim)] == before  # resumed bit-identically
    assert history(victim)[0].get("marker") == 1  # continued from epoch 1's checkpoint, not restarted


def test_protocol_specs_are_the_train_teacher_commands(cli, monkeypatch, tmp_path):
    import camkd.train

    seen = []

    def capture(cfg, **kw):
        seen.append(cfg)
        return {"arch": cfg.arch, "best_top1": 0.0, "best_epoch": 1, "last_top1": 0.0, "seconds": 0.0, "out": ""}

    monkeypatch.setattr(camkd.train, "train_teacher", capture)
    equal, unequal = A.teacher_specs(A.AccuracyConfig()), A.teacher_specs(A.AccuracyConfig(protocol="unequal"))
    for spec in equal:
        r = cli("train-teacher", "-m", spec.arch, "-d", "fashion-mnist", "--epochs", "5", "--lr-decay-epochs", "3,4",
                "--seed", "0", "--out", tmp_path / spec.arch, "--auto-resume", "-q")
        assert r.exit_code == 0, r.output
        assert teacher_identity(seen[-1], "fp") == teacher_identity(spec.train_config(), "fp"), spec.arch
    assert teacher_identity(unequal[0].train_config(), "fp") == teacher_identity(equal[0].train_config(), "fp")
    extra = {"weak": ["--limit", "1000"], "noisy": ["--label-noise", "0.4", "--label-noise-seed", "0"]}
    for spec in unequal[1:]:
        r = cli("train-teacher", "-m", spec.arch, "-d", "fashion-mnist", "--epochs", "5", "--lr-decay-epochs", "3,4",
                "--seed", "0", "--out", tmp_path / spec.role, *extra[spec.role])
        assert r.exit_code == 0, r.output
        assert teacher_identity(seen[-1], "fp") == teacher_identity(spec.train_config(), "fp"), spec.role
    assert teacher_identity(unequal[2].train_config(), "fp") != teacher_identity(equal[2].train_config(), "fp")
    assert decay_schedule(5) == [3, 4] and decay_schedule(240) == [150, 180, 210]


def test_disagreement_rate():
    preds = np.array([[0, 1, 2, 3], [0, 1, 2, 0], [1, 1, 0, 0]])
    d = A.disagreement(preds)
    assert d[0] == [0.0, 0.25, 0.75] and d[1][2] == 0.5 and d[2][1] == 0.5 and d[2][2] == 0.0


def test_weights_on_a_hand_made_case():
    # 3 teachers, 4 samples of 3 classes, labels all 0. Teacher 2 is confidently wrong on samples 0 and 1.
    big = 8.0
    logits = np.zeros((4, 3, 3), dtype=np.float32)
    logits[:, 0, 0] = big  # teacher 0 right and confident everywhere
    logits[:, 1, 0] = 1.0  # teacher 1 right, unsure
    logits[:2, 2, 1] = big  # teacher 2 wrong on 0, 1
    logits[2:, 2, 0] = big  # right on 2, 3
    labels = np.zeros(4, dtype=np.int64)
    rows = A.weights_by_correctness(logits, labels, noisy_idx={2: np.array([1, 3, 10])})
    ce = torch.nn.functional.cross_entropy(torch.from_numpy(logits).reshape(12, 3), torch.zeros(12, dtype=torch.long),
                                           reduction="none").view(4, 3)
    w = ((1 - torch.softmax(ce, 1)) / 2).numpy()  # the paper's formula, written out
    assert rows[2]["n_wrong"] == 2 and rows[2]["accuracy"] == 50.0
    assert rows[2]["w_wrong"] == pytest.approx(w[:2, 2].mean()) and rows[2]["w_right"] == pytest.approx(w[2:, 2].mean())
    assert rows[2]["w_wrong"] < 0.01 < 0.3 < rows[2]["w_right"]  # the wrong teacher is down-weighted where it is wrong
    assert rows[2]["n_wrong_others_right"] == 2 and rows[0]["n_wrong"] == 0 and rows[0]["w_wrong"] is None
    assert rows[2]["n_corrupted"] == 2 and rows[2]["w_corrupted"] == pytest.approx(w[[1, 3], 2].mean())  # index 10 >= N
    assert "n_corrupted" not in rows[0]
    assert np.allclose(w.sum(1), 1.0)


def test_cli_errors(cli, one_error, tmp_path):
    r = cli("bench", "accuracy", "--protocol", "unequal", "--noise", "1.5", "--root", tmp_path / "r")
    one_error(r, r"^error: --label-noise")
    r = cli("bench", "accuracy", "--teacher-arch", "resnet8", "--teacher-arch", "resnet8", "--teacher-arch", "resnet14",
            "--root", tmp_path / "r")
    one_error(r, "different")
    r = cli("bench", "accuracy", "--teacher-arch", "resnet8", "--root", tmp_path / "r")
    one_error(r, "three")
    assert not (tmp_path / "r").exists()


def test_store_identity_views_and_dtype(tmp_path):
    base = small(tmp_path)
    shas = ["a" * 64, "b" * 64, "c" * 64]
    same = A.store_identity(small(tmp_path, views=2), shas)
    assert A.store_identity(base, shas) == same  # one view per epoch by default
    assert A.store_identity(small(tmp_path, views=1), shas) != same
    assert A.store_identity(small(tmp_path, dtype="float16"), shas) != same
    assert A.store_identity(base, shas[::-1]) != same  # the teachers' order is part of it
