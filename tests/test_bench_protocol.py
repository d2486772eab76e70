"""Smoke runs of `camkd bench protocol` (the reference protocol's projected time) at tiny sizes.

They check the output's structure, that every figure is a finite positive number and that the projection is
the stated arithmetic of the measured figures, never a timing (speed is measured by the benchmark itself).
"""

import json
import math

import pytest

from camkd.bench.common import cpu_model
from camkd.bench.config import ReferenceProtocolConfig
from camkd.bench.protocol import hms
from camkd.errors import CamkdError

TINY = ["--samples", "64", "--test-samples", "32", "--batch-size", "16", "--student", "resnet8", "--teacher-arch",
        "resnet8", "-K", "2", "--device", "cpu"]


def finite_positive(x) -> bool:
    return isinstance(x, float | int) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_protocol_smoke(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever the bench writes outside --out would land here
    out = tmp_path / "results" / "protocol"
    r = cli("bench", "protocol", *TINY, "--steps", "2", "--epochs", "10", "--views", "5", "--out", out)
    assert r.exit_code == 0, r.output
    whole = json.loads(out.with_suffix(".json").read_text())
    me, p = whole["measured"], whole["projected_seconds"]
    assert (me["timed_steps"], me["steps_per_epoch"], me["extrapolated"], me["cache_views"]) == (2, 4, True, 1)
    for v in [me["cache_samples_per_s"], me["store_images_per_s"], me["online_images_per_s"], me["evaluation_seconds"],
              *p.values(), whole["reference_over_camkd"]]:
        assert finite_positive(v), v
    trained = 4 * 16  # drop-last batches of one epoch
    assert p["cache_all_views"] == pytest.approx(5 * 64 / me["cache_samples_per_s"])
    assert p["store_epoch"] == pytest.approx(trained / me["store_images_per_s"] + me["evaluation_seconds"])
    assert p["online_epoch"] == pytest.approx(trained / me["online_images_per_s"] + me["evaluation_seconds"])
    assert p["camkd_total"] == pytest.approx(p["cache_all_views"] + 10 * p["store_epoch"])
    assert p["reference_total"] == pytest.approx(10 * p["online_epoch"])
    assert whole["reference_over_camkd"] == pytest.approx(p["reference_total"] / p["camkd_total"])
    assert whole["device"] == {"type": "cpu", "cpu": cpu_model(), "threads": whole["device"]["threads"]}
    assert whole["config"]["teacher"] == "resnet8" and whole["config"]["precision"] == "fp32"
    md = out.with_suffix(".md").read_text()
    assert md.startswith(f"Device: CPU ({cpu_model()}, ") and "GPU" not in md.replace("not a GPU figure", "")
    assert "2 of the 4 steps of epoch 2 were timed and **extrapolated**" in md and "this is not a GPU figure" in md
    assert f"**{hms(p['camkd_total'])}**" in md and f"**{hms(p['reference_total'])}**" in md
    assert "The reference's way takes **" in r.output  # printed as well as written
    disk = whole["disk"]  # the protocol's store from the measured bytes per sample-view, against the free space here
    opts = disk["options"]
    assert set(opts) == {"features float16", "features int8", "logits only (-f none)"} and disk["free_bytes"] > 0
    dense, int8, logits = (opts[k]["bytes_per_sample_view"] for k in opts)
    assert dense > int8 > logits > 0
    for o in opts.values():
        assert o["protocol_bytes"] == pytest.approx(o["bytes_per_sample_view"] * 64 * 5)
        assert o["views_that_fit"] == int(disk["free_bytes"] // (o["bytes_per_sample_view"] * 64))
    assert "| store | per sample-view | whole protocol | views that fit |" in md
    assert sorted(q.name for q in (tmp_path / "results").iterdir()) == ["protocol.json", "protocol.md", "protocol.png"]
    assert [q.name for q in tmp_path.iterdir()] == ["results"]  # nothing but what --out asked for


def test_bench_protocol_whole_epoch_and_precision(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("bench", "protocol", *TINY, "--whole-epoch", "--precision", "bf16", "--channels-last")
    assert r.exit_code == 0, r.output
    assert "the whole of epoch 2 (4 steps) was timed" in r.output and "Precision bf16, channels-last on." in r.output
    assert "extrapolated" not in r.output and list(tmp_path.iterdir()) == []  # nothing written without --out


def test_bench_protocol_bad_input(cli, one_error):
    one_error(cli("bench", "protocol", *TINY, "--batch-size", "128"),
              r"^error: bench protocol: --batch-size 128 is larger than --samples 64")
    one_error(cli("bench", "protocol", *TINY, "--student", "vgg9"), r"^error: .*vgg9")
    one_error(cli("bench", "protocol", *TINY, "--precision", "fp64"), r"^error: .*'fp64' is not one of")
    one_error(cli("bench", "protocol", *TINY, "--steps", "0"), r"^error: .*--steps")


def test_the_cli_defaults_are_the_config(cli, monkeypatch):
    """Without options the command runs ReferenceProtocolConfig's defaults (stated once, in camkd/bench/config.py):
    the reference protocol, 50,000 samples, 240 views and epochs, batch 64."""
    import camkd.bench.protocol

    seen = []

    def capture(cfg):
        seen.append(cfg)
        raise CamkdError("captured")

    monkeypatch.setattr(camkd.bench.protocol, "run_protocol", capture)
    assert cli("bench", "protocol").output == "error: captured\n"
    assert seen == [ReferenceProtocolConfig()]
    cfg = seen[0]
    assert (cfg.student, cfg.teacher, cfg.num_teachers, cfg.samples, cfg.epochs, cfg.views, cfg.batch_size) == \
        ("vgg8", "resnet32x4", 3, 50000, 240, 240, 64)


def test_hms():
    assert hms(0) == "0:00:00" and hms(59.6) == "0:01:00" and hms(3 * 3600 + 62) == "3:01:02"
    assert hms(float("inf")) == "inf"


def test_drop_page_cache_reaches_every_file(tmp_path):
    """Every file under the store is handed to posix_fadvise (the eviction itself is the kernel's and not observable
    without privileges; what is checked is that no file is missed, nested ones included)."""
    import os

    from camkd.bench.protocol import drop_page_cache

    (tmp_path / "a" / "b").mkdir(parents=True)
    for f in ("zarr.json", "a/c", "a/b/0.0"):
        (tmp_path / f).write_bytes(b"x" * 10)
    assert drop_page_cache(tmp_path) == (3 if hasattr(os, "posix_fadvise") else 0)
