"""The end-of-run report of cache-teachers."""

from __future__ import annotations

from camkd.methods import list_methods, required_layers


def servable_methods(layers: list[str] | set[str]) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """Methods (with their default options) a store with these feature layers can serve, and what the others lack."""
    ok, missing = [], {}
    for m in list_methods():
        need = tuple(x for x in required_layers(m) if x not in set(layers))
        if need:
            missing[m] = need
        else:
            ok.append(m)
    return ok, missing


def format_cache_summary(s: dict) -> str:
    lines = [f"cached {s['rows_computed']} sample-views in {s['seconds']:.1f}s ({s['samples_per_s']:.0f} samples/s) -> {s['path']}"]
    lines.append("teacher accuracy per view (%): " + ", ".join(s["teachers"]))
    for v, accs in enumerate(s["view_accuracy"]):
        lines.append(f"  view {v}: " + "  ".join(f"{a:.2f}" for a in accs))
    lines.append(f"store size {s['store_bytes'] / 2**20:.1f} MB; bytes per sample-view: "
                 + ", ".join(f"{k} {v:.0f}" for k, v in s["bytes_per_sample_view"].items()))
    ok, missing = servable_methods(s.get("layers", []))
    line = "serves --method " + ", ".join(ok)
    if missing:
        line += "; not " + ", ".join(f"{m} (needs {'+'.join(need)}: {' '.join('-f ' + _flag(x) for x in need)})"
                                     for m, need in missing.items())
    lines.append(line)
    return "\n".join(lines)


def _flag(layer: str) -> str:
    return "penultimate" if layer == "penultimate" else f"hint:{layer[4:]}"
