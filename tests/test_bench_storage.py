"""`camkd bench storage` plumbing on tiny synthetic data (no accuracy asserted: 2 epochs of 256 images)."""

from __future__ import annotations

import pytest
import torch

from camkd.bench.common import cpu_model
from camkd.bench.storage import StorageConfig, run_storage, to_markdown
from camkd.errors import CamkdError


def _cfg(root) -> StorageConfig:
    return StorageConfig(root=str(root), dataset="synthetic", teacher_archs=["resnet8", "wrn_16_1"], teacher_epochs=1,
                         teacher_limit=256, limit=256, epochs=2, seeds=1, batch_size=32, device="cpu",
                         options=["dense32", "topk2", "int8", "int8zstd"])


@pytest.mark.slow
def test_storage_bench_compares_bytes_and_reuses_everything(tmp_path):
    r = run_storage(_cfg(tmp_path))
    rows = r["rows"]
    assert set(rows) == {"dense32", "topk2", "int8", "int8zstd"}
    # K = 2 teachers, C = 10: dense float32 logits 80 B per sample-view; top-2 with float16 values is
    # index 4 + values 8 + lse 8 + log_tail 8 + ce 8 + log_entropy 8 = 44 B (plus chunk overhead)
    assert rows["dense32"]["logits_per_sample_view"] > 80 and rows["topk2"]["logits_per_sample_view"] < 60
    assert rows["int8"]["features_per_sample_view"] < rows["dense32"]["features_per_sample_view"] / 3
    assert rows["int8zstd"]["store_bytes"] < rows["int8"]["store_bytes"]
    assert rows["int8zstd"]["runs"] == rows["int8"]["runs"] and rows["int8zstd"]["same_as"] == "int8"
    assert len(rows["topk2"]["tail_mass_mean"]) == 2 and all(0 < q < 1 for q in rows["topk2"]["tail_mass_mean"])
    assert rows["topk2"]["paired_vs_dense32"]["diffs"] == [rows["topk2"]["runs"][0] - rows["dense32"]["runs"][0]]
    one_seed = rows["topk2"]["paired_vs_dense32"]
    assert one_seed["sd"] is None and one_seed["exceeds"] is False  # one seed: no spread, no verdict
    assert r["device"] == {"type": "cpu", "cpu": cpu_model(), "threads": [torch.get_num_threads()]}
    md = to_markdown(r)
    assert all(f"| {name} |" in md for name in rows) and f"; CPU ({cpu_model()}, " in md.splitlines()[0]
    # a rerun trains and writes nothing new
    ckpts = sorted(tmp_path.rglob("last.pth"))
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    again = run_storage(_cfg(tmp_path))
    assert {p: p.stat().st_mtime_ns for p in sorted(tmp_path.rglob("last.pth"))} == before
    assert again["rows"]["topk2"]["runs"] == rows["topk2"]["runs"]


def test_unknown_option_is_an_error(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.options = ["dense8"]
    with pytest.raises(CamkdError, match="unknown storage option"):
        run_storage(cfg)
    assert not any(tmp_path.iterdir())
