"""fit's steps: resume (at every epoch boundary, bit for bit; a finished run untouched), the per-epoch record,
the one reduction, the checkpoints' recorded options, TensorBoard."""

import json

import numpy as np
import pytest
import torch
from configs import train_cfg

import camkd.runs
from camkd.checkpoint import load_checkpoint
from camkd.data.order import epoch_order
from camkd.epoch_plan import EpochPlan, rank_rows
from camkd.errors import CamkdError
from camkd.fit import all_sum_parts
from camkd.sources import plan_rows
from camkd.train import train_teacher

SMALL = dict(arch="resnet8", dataset="synthetic", batch_size=32, lr=0.05, synthetic_samples=384, progress=False,
             deterministic=True)
TINY = dict(arch="resnet8", dataset="synthetic", batch_size=32, synthetic_samples=64, progress=False)
RECORD_KEYS = {"epoch", "view", "lr", "loss_ce", "train_loss", "train_acc", "test_top1", "test_top5", "test_loss",
               "images_per_s", "world_size"}


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def files(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_args(out, *extra):
    return ["train-teacher", "-m", "resnet8", "-d", "synthetic", "--limit", "64", "--batch-size", "32", "--device", "cpu",
            "-q", "--out", out, *extra]


def test_resumed_after_every_epoch_equals_uninterrupted(tmp_path):
    full = train_teacher(train_cfg(**SMALL, epochs=3, out=str(tmp_path / "a")))
    for epochs in (1, 2, 3):  # "interrupted" after each epoch, resumed each time
        resumed = train_teacher(train_cfg(**SMALL, epochs=epochs, out=str(tmp_path / "b"), resume=epochs > 1))
        assert [r["epoch"] for r in resumed["history"]] == [epochs]
    a = load_checkpoint(tmp_path / "a" / "last.pth")
    b = load_checkpoint(tmp_path / "b" / "last.pth")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert full["last_top1"] == resumed["last_top1"] and full["best_epoch"] == resumed["best_epoch"]
    drop = ("images_per_s",)  # the only field that is a measurement
    strip = [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "a")]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "b")]


def test_each_epoch_record_has_the_documented_keys(tmp_path):
    s = train_teacher(train_cfg(**TINY, epochs=2, out=str(tmp_path / "r")))
    records = metrics(tmp_path / "r")
    assert records == json.loads(json.dumps(s["history"]))  # what fit returns is what it wrote
    for e, r in enumerate(records, 1):
        assert set(r) == RECORD_KEYS, set(r) ^ RECORD_KEYS
        assert r["epoch"] == e and r["world_size"] == 1 and r["train_loss"] == r["loss_ce"]
        assert 0 <= r["train_acc"] <= 100 and 0 <= r["test_top1"] <= r["test_top5"] <= 100
    ckpt = load_checkpoint(tmp_path / "r" / "last.pth")
    assert ckpt["meta"]["epoch"] == 2 and ckpt["meta"]["accuracy"] == records[-1]["test_top1"]
    assert ckpt["best"] == {"top1": s["best_top1"], "epoch": s["best_epoch"]}


def test_all_sum_parts_keeps_order_and_shapes():
    parts = [torch.arange(3.0), torch.tensor(2.5, dtype=torch.float32), torch.ones(2, 2), torch.zeros(0)]
    out = all_sum_parts(parts)
    assert [o.shape for o in out] == [p.shape for p in parts] and all(o.dtype == torch.float64 for o in out)
    for o, p in zip(out, parts):
        assert torch.equal(o, p.double())


def test_the_epoch_plan_cuts_the_seeded_order_once():
    plan = EpochPlan.of(50, seed=3, epoch=4, views=3, batch_size=8, drop_last=False, block_rows=4, window_blocks=2)
    order = np.concatenate(epoch_order(50, seed=3, epoch=4, block_rows=4, window_blocks=2))
    assert plan.view == 0 and np.array_equal(np.concatenate(plan.windows), order)
    assert [len(b) for b in plan.batches] == [8] * 6 + [2] and plan.starts == tuple(range(0, 56, 8))
    assert np.array_equal(np.concatenate(plan.batches), order)
    windows = [np.arange(5), np.arange(5, 17)]
    assert [len(b) for b in EpochPlan.cut(0, windows, 8, drop_last=True).batches] == [8, 8]
    assert [len(b) for b in EpochPlan.cut(0, [np.arange(17)], 8, drop_last=False).batches] == [8, 8]  # 1 row: no batch
    # a trailing batch that does not split into 4 slices of at least 2 is left out; 2 slices of 3 train
    assert [len(b) for b in EpochPlan.cut(0, [np.arange(22)], 8, drop_last=False, slices=4).batches] == [8, 8]
    assert [len(b) for b in EpochPlan.cut(0, [np.arange(22)], 8, drop_last=False, slices=2).batches] == [8, 8, 6]
    rows = [b[rank_rows(len(b), 1, 2)] for b in plan.batches]
    assert [list(r) for r in plan.rank_batches(1, 2)] == [list(r) for r in rows] and list(rows[-1]) == [int(order[-1])]


def test_streamed_rows_are_cut_where_the_plan_cuts():
    rng = np.random.default_rng(0)
    order = rng.permutation(40).astype(np.int64)
    windows = [order[:3], order[3:21], order[21:22], order[22:]]
    table = {"hint1": [np.arange(40) * 10, np.arange(40) * 100], "penultimate": [np.arange(80).reshape(40, 2)]}
    stream = [(w, {name: [a[w] for a in per] for name, per in table.items()}) for w in windows]
    whole = EpochPlan.cut(1, windows, 6, drop_last=False)
    gap = EpochPlan(1, whole.windows, whole.batches[:1] + whole.batches[3:], whole.starts[:1] + whole.starts[3:])
    for plan in (whole, gap):
        got = list(plan_rows(plan, iter(stream)))
        assert len(got) == len(plan.batches)
        for idx, data in zip(plan.batches, got):
            for name, per in table.items():
                assert all(np.array_equal(a, t[idx]) for a, t in zip(data[name], per)), name


def test_a_finished_run_is_left_untouched(cli, tmp_path):
    out = tmp_path / "r"
    assert cli(*cli_args(out, "--epochs", "2")).exit_code == 0
    before = files(out)
    assert any(name.startswith("tb/") for name in before)
    for epochs in ("1", "2"):
        r = cli(*cli_args(out, "--epochs", epochs, "--resume"))
        assert r.exit_code == 0, r.output
        assert "is already finished: it has trained 2 epochs (--epochs " in r.output and "resuming" not in r.output
        assert "(raise --epochs above 2 to train on)" in r.output, r.output
        assert files(out) == before  # byte for byte: no metrics line, no TensorBoard file, no checkpoint rewritten
    one = tmp_path / "one"
    assert cli(*cli_args(one, "--epochs", "1")).exit_code == 0
    r = cli(*cli_args(one, "--epochs", "1", "--resume"))
    assert "it has trained 1 epoch (--epochs 1)" in r.output and "raise --epochs above 1" in r.output, r.output
    s = train_teacher(train_cfg(arch="resnet8", dataset="synthetic", limit=64, batch_size=32, progress=False, epochs=2,
                                out=str(out), auto_resume=True))  # the same run through the API
    assert s["history"] == [] and s["last_top1"] == metrics(out)[-1]["test_top1"] and files(out) == before


def test_resume_and_auto_resume_together_is_one_error(cli, one_error, tmp_path):
    one_error(cli(*cli_args(tmp_path / "r", "--resume", "--auto-resume")), r"--resume and --auto-resume together.*give one")
    assert not (tmp_path / "r").exists()


def test_a_defaulted_option_is_recorded_and_compared_as_its_value(tmp_path):
    """lr and aug_seed left to their defaults are recorded as the numbers used: the same numbers given explicitly
    resume, other numbers are refused with both values (never None)."""
    kw = {k: v for k, v in TINY.items()}
    train_teacher(train_cfg(**kw, epochs=1, seed=3, out=str(tmp_path / "r")))
    options = load_checkpoint(tmp_path / "r" / "last.pth")["meta"]["options"]
    assert options["optim"]["lr"] == 0.05 and options["aug_seed"] == 3  # resnet8's default lr; the run's seed
    train_teacher(train_cfg(**kw, epochs=2, seed=3, lr=0.05, aug_seed=3, out=str(tmp_path / "r"), resume=True))
    with pytest.raises(CamkdError, match=r"made with --lr 0\.05, this run has --lr 0\.1;") as e:
        train_teacher(train_cfg(**kw, epochs=3, seed=3, lr=0.1, out=str(tmp_path / "r"), resume=True))
    assert "None" not in str(e.value)


def test_other_training_data_is_named_with_balanced_quotes(tmp_path):
    train_teacher(train_cfg(**TINY, epochs=1, out=str(tmp_path / "r")))
    with pytest.raises(CamkdError) as e:
        train_teacher(train_cfg(**{**TINY, "synthetic_samples": 96}, epochs=2, out=str(tmp_path / "r"), resume=True))
    msg = str(e.value)
    assert "dataset_fingerprint" not in msg and "other training data (" in msg and "--dataset, --limit" in msg
    assert msg.count("'") % 2 == 0 and "...'" in msg, msg


# ---- TensorBoard ---------------------------------------------------------------------------------------

def test_tensorboard_event_files_hold_every_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_teacher(train_cfg(**TINY, epochs=2, out=str(tmp_path / "r")))
    events = list((tmp_path / "r" / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "r" / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == RECORD_KEYS - {"epoch"}
    for key in RECORD_KEYS - {"epoch"}:
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert got == [(r["epoch"], float(np.float32(r[key]))) for r in metrics(tmp_path / "r")], key


def test_without_tensorboard_no_files_and_one_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(camkd.runs, "tensorboard_available", lambda: False)
    camkd.runs._no_tensorboard_note.cache_clear()
    for name in ("a", "b"):
        train_teacher(train_cfg(**TINY, epochs=1, out=str(tmp_path / name)))
        assert not (tmp_path / name / "tb").exists()
    assert capsys.readouterr().err.count("tensorboard is not installed") == 1
    camkd.runs._no_tensorboard_note.cache_clear()


def _stop_in_epoch_1():
    from camkd.job import Hooks

    def on_step(epoch, losses):
        raise KeyboardInterrupt

    return Hooks(on_step=on_step)


def test_a_run_stopped_before_its_first_checkpoint_leaves_no_folders_it_made(tmp_path):
    """--out's parents that the run created go too: no empty folder is left behind."""
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(KeyboardInterrupt):
        train_teacher(train_cfg(**TINY, epochs=1, out=str(out)), hooks=_stop_in_epoch_1())
    assert list(tmp_path.iterdir()) == []


def test_a_new_run_drops_the_scalars_of_a_run_killed_in_its_first_epoch(tmp_path):
    """A run killed before its first checkpoint leaves tb/ (kill -9 cleans nothing up); the next new run in that folder
    (e.g. --auto-resume after a restart) starts TensorBoard anew instead of keeping the dead run's event file."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "r"
    (out / "tb").mkdir(parents=True)
    (out / "tb" / "events.out.tfevents.0.dead").write_bytes(b"stale")
    (out / "metrics.jsonl").write_text("")
    train_teacher(train_cfg(**TINY, epochs=1, out=str(out), auto_resume=True))
    events = sorted(p.name for p in (out / "tb").iterdir())
    assert len(events) == 1 and not events[0].endswith(".dead"), events
    assert [m["epoch"] for m in metrics(out)] == [1]


def test_an_option_left_out_is_named_as_left_out(tmp_path):
    train_teacher(train_cfg(**TINY, epochs=1, limit=32, out=str(tmp_path / "r")))
    with pytest.raises(CamkdError, match=r"was made with --limit 32, this run has no --limit;"):
        train_teacher(train_cfg(**TINY, epochs=2, out=str(tmp_path / "r"), resume=True))
