"""The end-of-run report of cache-teachers."""

from __future__ import annotations


def format_cache_summary(s: dict) -> str:
    lines = [f"cached {s['rows_computed']} sample-views in {s['seconds']:.1f}s ({s['samples_per_s']:.0f} samples/s) -> {s['path']}"]
    lines.append("teacher accuracy per view (%): " + ", ".join(s["teachers"]))
    for v, accs in enumerate(s["view_accuracy"]):
        lines.append(f"  view {v}: " + "  ".join(f"{a:.2f}" for a in accs))
    lines.append(f"store size {s['store_bytes'] / 2**20:.1f} MB; bytes per sample-view: "
                 + ", ".join(f"{k} {v:.0f}" for k, v in s["bytes_per_sample_view"].items()))
    return "\n".join(lines)
