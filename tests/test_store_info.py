"""What is said about a store: cache-info, cache-teachers' summary (the methods it serves) and sizes."""

from __future__ import annotations

import zarr

from camkd.cache import CacheConfig, cache_teachers


def test_cache_info(cli, rt):
    path, _ = rt
    r = cli("cache-info", path)
    assert r.exit_code == 0, r.output
    assert "N=320" in r.output and "complete   4/4 blocks" in r.output and "features/hint2/t1" in r.output
    assert "[view,sample,teacher,class]" in r.output


def test_summary_names_the_methods_a_store_serves(rt, teachers, tmp_path):
    from camkd.cache import format_cache_summary
    from camkd.methods import list_methods

    _, summary = rt
    text = format_cache_summary(summary)
    assert "teacher top-1 on the cached training views (%): t0 resnet8, t1 wrn_16_1\n  view 0: " in text, text
    assert f"serves --method {', '.join(list_methods())}" in text.splitlines()[-1], text
    s = cache_teachers(CacheConfig(teachers=[str(teachers["resnet8"])], dataset="synthetic", limit=64, device="cpu",
                                   progress=False, evaluate=False, features=["none"], out=str(tmp_path / "n.zarr")))
    last = format_cache_summary(s).splitlines()[-1]
    assert "camkd (needs penultimate: -f penultimate)" in last and "fitnet (needs hint2: -f hint:2)" in last, last
    assert last.startswith("serves --method ") and "kd" in last.split(";")[0], last


def test_sizes_count_shards_and_show_per_sample_view(cli, rt):
    from camkd.store.sizes import array_sizes

    path, _ = rt
    sizes = array_sizes(zarr.open_group(str(path), mode="r"))
    for name in ("features/hint2/t0", "logits", "labels"):  # sharded, one chunk per block, plain
        on_disk = sum(f.stat().st_size for f in (path / name).rglob("*") if f.is_file())
        assert sizes[name] == on_disk > 0, name
    r = cli("cache-info", path)
    line = next(x for x in r.output.splitlines() if x.startswith("per sample-view"))
    assert "logits" in line and "features/hint2/t0" in line, line


def test_report_sizes_in_a_unit_that_shows_them(rt):
    from camkd.cache import format_cache_summary
    from camkd.store.sizes import human

    assert [human(x) for x in (0, 1023, 20 * 1024, 5 * 2**20 + 2**19, 3 * 2**30, 2**50)] == \
        ["0 B", "1023 B", "20.0 KB", "5.5 MB", "3.0 GB", "1.0 PB"]
    _, summary = rt
    small = dict(summary, store_bytes=20 * 1024)
    assert "store size 20.0 KB;" in format_cache_summary(small)


def test_cache_teachers_and_cache_info_print_the_same_sizes(cli, teachers, tmp_path):
    """The same per sample-view figures, in the same (sorted) order, from the same function."""
    path = tmp_path / "z.zarr"
    r = cli("cache-teachers", "-t", teachers["resnet8"], "-t", teachers["wrn_16_1"], "-d", "synthetic", "--limit", "64",
            "-V", "1", "-f", "penultimate", "-f", "hint:1", "--compressor", "zstd", "--no-eval", "--device", "cpu", "-q",
            "--out", path)
    assert r.exit_code == 0, r.output
    made = next(x for x in r.output.splitlines() if x.startswith("store size ")).split("; per sample-view ")[1]
    info = cli("cache-info", path).output
    shown = next(x for x in info.splitlines() if x.startswith("per sample-view ")).removeprefix("per sample-view ")
    assert made == shown, (made, shown)
    names = [part.rsplit(" ", 2)[0] for part in shown.split("(", 1)[1].rstrip(")").split(", ")]
    assert names == sorted(names) and len(names) == 6, names  # aug, 4 features, logits
