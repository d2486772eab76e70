"""camkd report / camkd evaluate / TensorBoard scalars, on small real runs (synthetic data, 2 epochs)."""

import json
import math
import shutil
import statistics

import numpy as np
import pytest
import torch
from configs import distill_cfg, train_cfg

from camkd.cache import CacheConfig, cache_teachers
from camkd.checkpoint import load_checkpoint
from camkd.data import load_split
from camkd.distill import distill
from camkd.evaluate import evaluate_checkpoint
from camkd.models import create_model
from camkd.report import plot, report, short_names, to_markdown
from camkd.train import train_teacher

N = 96
TEACHER = dict(arch="resnet8", dataset="synthetic", synthetic_samples=N, epochs=2, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two teachers (seeds 0, 1), their store, two camkd students (seeds 0, 1): run folders by name."""
    root = tmp_path_factory.mktemp("runs")
    for s in (0, 1):
        train_teacher(train_cfg(**TEACHER, seed=s, out=str(root / f"t{s}")))
    store = root / "s.zarr"
    cache_teachers(CacheConfig(teachers=[str(root / "t0" / "best.pth"), str(root / "t1" / "best.pth")], dataset="synthetic",
                               options={"num_samples": N}, views=2, aug_seed=3, dtype="float32", out=str(store), device="cpu",
                               progress=False))
    for s in (0, 1):
        distill(distill_cfg(arch="resnet8", method="camkd", cache=str(store), epochs=2, batch_size=32, seed=s,
                            out=str(root / f"c{s}"), progress=False))
    return {name: root / name for name in ("t0", "t1", "c0", "c1")}


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_report_values_are_the_metrics(runs):
    r = report([runs[n] for n in ("t0", "t1", "c0", "c1")])
    assert [x["run"] for x in r["runs"]] == [str(runs[n]) for n in ("t0", "t1", "c0", "c1")]
    for name, x in zip(("t0", "t1", "c0", "c1"), r["runs"]):
        m = metrics(runs[name])
        assert x["history"] == m
        assert x["final_top1"] == m[-1]["test_top1"] and x["final_top5"] == m[-1]["test_top5"]
        assert x["final_train_loss"] == m[-1]["train_loss"]
        best = max(m, key=lambda e: e["test_top1"])
        assert (x["best_top1"], x["best_epoch"]) == (best["test_top1"], best["epoch"])
        assert x["images_per_s"] == statistics.median(e["images_per_s"] for e in m)
        assert (x["arch"], x["epochs_done"], x["epochs_planned"], x["seed"]) == ("resnet8", 2, 2, int(name[1]))
        assert x["teacher_weights"] == m[-1].get("teacher_weights")
        assert x["inter_weights"] == m[-1].get("inter_weights")
    assert [x["method"] for x in r["runs"]] == ["ce", "ce", "camkd", "camkd"]
    assert r["runs"][0]["teacher_weights"] is None and len(r["runs"][2]["teacher_weights"]) == 2


def test_camkd_records_its_feature_level_weights_per_epoch(runs):
    m = metrics(runs["c0"])
    assert "inter_weights" not in m[0]  # epoch 1: no feature term (as the reference)
    w = m[1]["inter_weights"]
    assert len(w) == 2 and math.isclose(sum(w), 1.0, rel_tol=1e-5) and all(0 < v < 1 for v in w)
    assert w != m[1]["teacher_weights"]


@pytest.mark.parametrize("micro", [1, 2])
def test_inter_weights_are_the_mean_of_every_batch(runs, tmp_path, monkeypatch, micro):
    """The epoch record is the mean of the method's per-(micro-)batch diagnostic, seen here by wrapping the method."""
    from camkd.methods.camkd import CAMKD

    seen = []
    original = CAMKD.feature_term

    def spy(self, *args, **kw):
        loss, diag = original(self, *args, **kw)
        seen.append(diag["inter_weights"].double().clone())
        return loss, diag

    monkeypatch.setattr(CAMKD, "feature_term", spy)
    distill(distill_cfg(arch="resnet8", method="camkd", cache=str(runs["c0"].parent / "s.zarr"), epochs=2, batch_size=32,
                        micro_batches=micro, out=str(tmp_path / "r"), progress=False))
    assert len(seen) == (N // 32) * micro  # epoch 2 only: every step, every micro-batch
    want = torch.stack(seen).mean(0)
    assert metrics(tmp_path / "r")[1]["inter_weights"] == pytest.approx(want.tolist(), rel=1e-6)


def test_markdown_and_out_files(runs, cli, tmp_path):
    res = cli("report", runs["t0"], runs["c0"], "--out", tmp_path / "rep" / "r.json")
    assert res.exit_code == 0, res.output
    table = [line for line in res.output.splitlines() if line.startswith(f"| {runs['c0']} ")]
    m = metrics(runs["c0"])[-1]
    assert len(table) == 1 and f"| {m['test_top1']:.2f} |" in table[0]
    assert " / ".join(f"{w:.3f}" for w in m["teacher_weights"]) in table[0]
    data = json.loads((tmp_path / "rep" / "r.json").read_text())
    assert data["runs"][1]["history"] == metrics(runs["c0"])
    assert (tmp_path / "rep" / "r.md").read_text().startswith("| run |")
    assert (tmp_path / "rep" / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake_run(src, dst, seed, top1s, **options):
    """A copy of run ``src`` whose checkpoint says ``seed`` (and ``options`` in optim) and whose metrics have these top-1s."""
    dst.mkdir()
    ck = load_checkpoint(src / "last.pth")
    ck["meta"]["options"]["run"].update(seed=seed, out=str(dst))
    ck["meta"]["options"]["optim"].update(options)
    torch.save(ck, dst / "last.pth")
    base = metrics(src)[-1]
    lines = [{**base, "epoch": e, "test_top1": t, "train_loss": 1.0 + seed + e} for e, t in enumerate(top1s, 1)]
    (dst / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_group_mean_and_sample_std(runs, tmp_path):
    _fake_run(runs["c0"], tmp_path / "a", 0, [5.0, 10.0])
    _fake_run(runs["c0"], tmp_path / "b", 1, [30.0, 20.0])
    _fake_run(runs["c0"], tmp_path / "c", 2, [40.0, 40.0])
    _fake_run(runs["c0"], tmp_path / "d", 3, [50.0, 60.0], lr=0.1)  # another config: its own group
    r = report([tmp_path / n for n in "abcd"], group=True)
    g, other = r["groups"]
    assert g["runs"] == [str(tmp_path / n) for n in "abc"] and g["seeds"] == [0, 1, 2] and g["n"] == 3
    mean = (10.0 + 20.0 + 40.0) / 3
    std = math.sqrt(((10.0 - mean) ** 2 + (20.0 - mean) ** 2 + (40.0 - mean) ** 2) / 2)  # sample std (n - 1)
    assert g["final_top1"]["mean"] == pytest.approx(mean, rel=1e-12)
    assert g["final_top1"]["std"] == pytest.approx(std, rel=1e-12)
    assert g["best_top1"]["mean"] == pytest.approx((10.0 + 30.0 + 40.0) / 3, rel=1e-12)
    assert g["final_train_loss"]["mean"] == pytest.approx(4.0, rel=1e-12) and g["final_train_loss"]["std"] == pytest.approx(1.0)
    assert other["runs"] == [str(tmp_path / "d")] and other["final_top1"] == {"mean": 60.0, "std": None}
    assert "| 23.33 ± 15.28 |" in to_markdown(r)
    # two groups of one arch and method are labelled by what sets them apart, as options
    assert (g["label"], other["label"]) == ("resnet8 camkd (--lr 0.05)", "resnet8 camkd (--lr 0.1)")


def test_teachers_and_students_group_apart(runs):
    groups = report(list(runs.values()), group=True)["groups"]
    assert [(g["method"], g["seeds"]) for g in groups] == [("ce", [0, 1]), ("camkd", [0, 1])]
    w = [metrics(runs[n])[-1]["teacher_weights"] for n in ("c0", "c1")]
    assert groups[1]["teacher_weights"] == pytest.approx([(a + b) / 2 for a, b in zip(*w)], rel=1e-12)


def test_a_parent_folder_expands_to_its_runs(runs):
    r = report([runs["t0"].parent])
    assert [x["run"] for x in r["runs"]] == [str(runs[n]) for n in ("c0", "c1", "t0", "t1")]


@pytest.mark.parametrize("name", ["t0", "c0"])
def test_evaluate_equals_the_last_epoch(runs, name):
    m = metrics(runs[name])
    r = evaluate_checkpoint(runs[name] / "last.pth", device="cpu")
    assert (r["top1"], r["top5"]) == (m[-1]["test_top1"], m[-1]["test_top5"])
    assert r["loss"] == pytest.approx(m[-1]["test_loss"], rel=1e-6)
    best = max(m, key=lambda e: e["test_top1"])
    assert evaluate_checkpoint(runs[name] / "best.pth", device="cpu")["top1"] == best["test_top1"]


def test_evaluate_train_split_and_cli(runs, cli):
    for name in ("t0", "c0"):  # the run's training samples: through the store for a student (fingerprint checked)
        r = evaluate_checkpoint(runs[name] / "last.pth", split="train", device="cpu")
        assert r["samples"] == N and 0.0 <= r["top1"] <= 100.0
    res = cli("evaluate", runs["c0"] / "last.pth", "--json", "--device", "cpu", "--limit", "40", "--batch-size", "16")
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["samples"] == 40 and r["split"] == "test" and r["arch"] == "resnet8" and r["method"] == "camkd"
    res = cli("evaluate", runs["t0"] / "best.pth", "--device", "cpu")
    assert res.exit_code == 0 and len(res.output.strip().splitlines()) == 1
    assert f"top-1 {metrics(runs['t0'])[-1]['test_top1']:.2f}%" in res.output


def test_evaluate_a_reference_checkpoint(runs, cli, tmp_path):
    """ARCH=PATH and --dataset: a {'model': state_dict} file (RepDistiller's layout) on the dataset's whole test split."""
    state = load_checkpoint(runs["t0"] / "last.pth")["model"]
    torch.save({"epoch": 240, "model": state, "accuracy": 12.5}, tmp_path / "ref.pth")
    res = cli("evaluate", f"resnet8={tmp_path / 'ref.pth'}", "--dataset", "synthetic", "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    # independently: one forward pass over the default synthetic test split, x / 255 then (x - mean) / std
    test = load_split("synthetic", "test")
    model = create_model("resnet8", num_classes=10)
    model.load_state_dict(state)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (test.norm.mean, test.norm.std))
    with torch.no_grad():
        logits = model.eval()((test.images.float() / 255 - mean) / std)
    assert r["samples"] == len(test) == 256 and r["epoch"] == 240 and r["method"] is None
    assert r["top1"] == pytest.approx(100.0 * (logits.argmax(1) == test.labels).float().mean().item(), abs=1e-9)
    assert r["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, test.labels).item(), rel=1e-5)
    res = cli("evaluate", f"resnet8={tmp_path / 'ref.pth'}", "-d", "synthetic", "--limit", "10", "--device", "cpu")
    assert res.exit_code == 0 and "(256 images" not in res.output and "(10 images, the first 10 of the test split" in res.output


def test_evaluate_reference_errors(runs, cli, tmp_path, one_error):
    torch.save({"model": load_checkpoint(runs["t0"] / "last.pth")["model"]}, tmp_path / "ref.pth")
    ref = tmp_path / "ref.pth"
    one_error(cli("evaluate", f"resnet8={ref}"), r"no camkd meta, so it names no data; add --dataset .*synthetic")
    one_error(cli("evaluate", f"resnet14={ref}", "-d", "synthetic"), r"does not fit arch 'resnet14'")
    one_error(cli("evaluate", f"resnet8={ref}", "-d", "fashion-mnist"),
                   r"10-class, 3-channel resnet8, but fashion-mnist has 10 classes and 1 channels; is it the right --dataset")
    one_error(cli("evaluate", f"resnet14={runs['t0'] / 'last.pth'}"), r"camkd checkpoint of arch 'resnet8', not 'resnet14'")
    one_error(cli("evaluate", runs["t0"] / "last.pth", "-d", "cifar10"), r"trained on synthetic, not cifar10; leave out --dataset")


def test_report_errors(runs, cli, tmp_path, one_error):
    one_error(cli("report", tmp_path / "nope"), r"nope does not exist")
    one_error(cli("report", runs["t0"] / "last.pth"), r"is a file, not a run folder.*camkd evaluate")
    (tmp_path / "e").mkdir()
    one_error(cli("report", tmp_path / "e"), r"e is not a run folder \(no metrics.jsonl")
    (tmp_path / "e" / "metrics.jsonl").write_text("")
    one_error(cli("report", tmp_path / "e"), r"metrics.jsonl is empty")
    (tmp_path / "e" / "metrics.jsonl").write_text('{"epoch": 1, "test_top1": 5.0, "train_loss": 1.0}\n{"epo')
    one_error(cli("report", tmp_path / "e"), r"metrics.jsonl line 2 is not JSON")
    (tmp_path / "e" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    one_error(cli("report", tmp_path / "e"), r"line 1 is not a camkd epoch record")
    shutil.copy(runs["t0"] / "metrics.jsonl", tmp_path / "e" / "metrics.jsonl")
    one_error(cli("report", tmp_path / "e"), r"no last.pth or best.pth")
    one_error(cli("report", runs["t0"], runs["t0"]), r"given twice")
    one_error(cli("report"), r"missing argument .RUN")
    one_error(cli("report", runs["t0"], "--out", tmp_path), r"--out .* is a folder; give a file name prefix such as")
    (tmp_path / "file").write_text("")
    one_error(cli("report", runs["t0"], "--out", tmp_path / "file" / "r.json"), r"file is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "file"]  # nothing written


@pytest.mark.parametrize("given", ["rep", "rep.json", "rep.md", "rep.png"])
def test_out_is_a_prefix(runs, cli, tmp_path, given):
    res = cli("report", runs["t0"], "--out", tmp_path / given)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep.json", "rep.md", "rep.png"]
    assert res.output.rstrip().endswith(", ".join(str(tmp_path / f"rep{s}") for s in (".json", ".md", ".png")))


def test_short_names():
    assert short_names(["/x/runs/t0", "/x/runs/c0"]) == ["t0", "c0"]
    assert short_names(["runs/a/s0", "runs/b/s0", "runs/b/s1"]) == ["a/s0", "b/s0", "s1"]
    assert short_names(["b", "a/b"]) == ["b", "a/b"] and short_names(["."]) == ["."]


def test_plot_of_one_epoch_spans_that_epoch_with_short_legends(runs, tmp_path):
    import matplotlib.pyplot as plt

    _fake_run(runs["c0"], tmp_path / "a", 0, [5.0])  # one epoch each, teacher weights logged
    _fake_run(runs["c0"], tmp_path / "b", 1, [7.0])
    fig = plot(report([tmp_path / "a", tmp_path / "b"]))
    try:
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in panels] == ["test top-1 (%)", "train loss", "teacher weights (logit level)",
                                                     "teacher weights (feature level)"]
        for ax in panels:
            assert ax.get_xlim() == (0.5, 1.5)
            assert [x for x in ax.get_xticks() if 0.5 <= x <= 1.5] == [1.0]  # epoch 1, not 0.5, 0.6, ...
            assert all(line.get_marker() == "o" for line in ax.get_lines())  # a single point shows
        assert [t.get_text() for t in panels[0].get_legend().get_texts()] == ["a", "b"]
        assert [t.get_text() for t in panels[2].get_legend().get_texts()] == ["a t0", "a t1", "b t0", "b t1"]
    finally:
        plt.close(fig)


def test_evaluate_errors(runs, cli, tmp_path, one_error):
    one_error(cli("evaluate", tmp_path / "nope.pth"), r"checkpoint .*nope.pth not found")
    one_error(cli("evaluate", runs["t0"]), r"checkpoint .*t0 is a folder; give a checkpoint in it, e\.g\. .*t0/best\.pth")
    one_error(cli("evaluate", runs["t0"] / "metrics.jsonl"), r"not a readable torch checkpoint")
    torch.save({"model": create_model("resnet8", num_classes=10).state_dict()}, tmp_path / "ref.pth")
    one_error(cli("evaluate", tmp_path / "ref.pth"), r"no camkd meta, so it names no arch; pass it as ARCH=PATH")
    one_error(cli("evaluate", runs["t0"] / "last.pth", "--split", "val"), r"invalid value for '--split'")
    if not torch.cuda.is_available():
        one_error(cli("evaluate", runs["t0"] / "last.pth", "--device", "cuda"), r"no CUDA device")


# ---- TensorBoard ----------------------------------------------------------------------------------

def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as TensorBoard keeps it: float32 values, lists as key/i, step = epoch."""
    out: dict[str, list] = {}
    for rec in metrics(folder):
        for key, v in rec.items():
            if key != "epoch":
                for tag, x in ([(f"{key}/{i}", x) for i, x in enumerate(v)] if isinstance(v, list) else [(key, v)]):
                    out.setdefault(tag, []).append((rec["epoch"], float(np.float32(x))))
    return out


def test_tensorboard_scalars_equal_the_metrics(runs):
    pytest.importorskip("tensorboard")
    for name in ("t0", "c0"):
        got = scalars(runs[name])
        assert got == expected_scalars(runs[name])
        assert "test_top1" in got and ("inter_weights/1" in got) == (name == "c0")


def test_tensorboard_after_resume_keeps_each_epoch_once(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "r"
    kw = dict(TEACHER, synthetic_samples=64, out=str(run))
    train_teacher(train_cfg(**{**kw, "epochs": 1}))
    shutil.copy(run / "last.pth", tmp_path / "epoch1.pth")
    train_teacher(train_cfg(**kw, resume=True))
    shutil.copy(tmp_path / "epoch1.pth", run / "last.pth")  # as if killed after epoch 2's metrics, before its checkpoint
    train_teacher(train_cfg(**kw, resume=True))  # redoes epoch 2 (another images_per_s): TensorBoard keeps the new one
    assert [m["epoch"] for m in metrics(run)] == [1, 2]
    assert scalars(run) == expected_scalars(run)


def test_no_tensorboard_no_tb_folder(tmp_path, monkeypatch):
    import camkd.runs

    monkeypatch.setattr(camkd.runs, "tensorboard_available", lambda: False)
    train_teacher(train_cfg(**{**TEACHER, "epochs": 1, "synthetic_samples": 64}, out=str(tmp_path / "r")))
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["best.pth", "best.pth.sha256", "last.pth",
                                                                  "last.pth.sha256", "metrics.jsonl"]


def test_a_broken_tensorboard_stops_no_run(tmp_path, monkeypatch, capsys):
    import sys

    import camkd.runs

    monkeypatch.setattr(camkd.runs, "tensorboard_available", lambda: True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import raises ImportError
    s = train_teacher(train_cfg(**{**TEACHER, "epochs": 1, "synthetic_samples": 64}, out=str(tmp_path / "r")))
    assert s["epochs"] == 1 and not (tmp_path / "r" / "tb").exists()
    assert "tensorboard is installed but does not import" in capsys.readouterr().err
