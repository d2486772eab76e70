"""Smoke runs of the speed benchmark at tiny sizes (the accuracy protocols: test_bench_accuracy.py), so the benchmark code cannot rot.

They check the outputs' structure and that every ratio is a finite positive number, not the
targets (speed is measured by the benchmark itself, side by side, never by a timed test).
"""

import json
import math

from PIL import Image


def finite_positive(x) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


def test_bench_speed_smoke(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever the bench writes outside --out would land here
    out = tmp_path / "results" / "speed.json"
    r = cli("bench", "speed", "--student", "resnet8", "--teacher-arch", "resnet8", "-K", "2", "--samples", "64",
            "--batch-size", "16", "--repeats", "1", "--threads", "1", "--ranks", "2", "--device", "cpu", "--out", out,
            "--method", "avg", "--method", "camkd")  # the two with online rows (--method: tested below)
    assert r.exit_code == 0, r.output
    whole = json.loads(out.read_text())
    assert set(whole["ranks"]) == {"ce", "camkd+features"}
    assert all(finite_positive(v["2"]) for v in whole["ranks"].values())
    res = whole["by_threads"]["1"]
    assert set(res) >= {"cache", "reader", "train_images_per_s", "cached_over_ce", "cached_over_online", "bytes_per_sample_view"}
    names = {"avg", "camkd(beta=0)", "camkd+features"}
    assert set(res["cached_over_ce"]) == names and set(res["cached_over_online"]) == {"avg", "camkd+features"}
    assert res["cache"]["best_inference_batch"] in (32, 64, 128, 256)
    for v in list(res["cached_over_ce"].values()) + list(res["cached_over_online"].values()) + [res["cache"]["ratio"]]:
        assert finite_positive(v)
    for v in res["reader"].values():
        assert finite_positive(v["samples_per_s"]) and finite_positive(v["MB_per_s"])
    b16, b32 = res["bytes_per_sample_view"]["float16"], res["bytes_per_sample_view"]["float32"]
    assert b32["logits"] > b16["logits"] > 0  # float32 is stored at twice the bytes (plus checksums)
    assert "| ce (the limit) |" in out.with_suffix(".md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # nothing but what --out asked for
    assert Image.open(out.with_suffix(".png")).size[0] > 100


def test_bench_writes_nothing_without_out(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "speed", "--student", "resnet8", "--teacher-arch", "resnet8", "-K", "1", "--samples", "64",
            "--batch-size", "16", "--repeats", "1", "--threads", "1", "--no-online", "--no-ranks", "--device", "cpu"]
    r = cli(*args, "--method", "kd")  # ce and kd only
    assert r.exit_code == 0, r.output
    rows = [line.split("|")[1].strip() for line in r.output.splitlines() if line.startswith("| ") and "img" not in line]
    assert rows[:3] == ["variant", "ce (the limit)", "kd"] and "avg" not in rows
    assert list(tmp_path.iterdir()) == []
    r = cli(*args, "--method", "kdd")
    assert r.exit_code == 2 and r.output.startswith("error: bench speed: unknown method 'kdd'; choose from aekd, avg, camkd")
