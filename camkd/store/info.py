"""`camkd cache-info`: what a store holds, how big it is, how complete."""

from __future__ import annotations

from pathlib import Path


from camkd.store.reader import open_store
from camkd.store.writer import _walk_arrays, array_sizes


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def cache_info(path: str | Path) -> str:
    """A human-readable report of attrs, arrays and completeness."""
    store = open_store(path)
    a = store.attrs
    ds = a["dataset"]
    lines = [
        f"store      {store.path} (format {a['format_version']}, camkd {a['camkd_version']})",
        f"dataset    {ds['name']} {ds['split']}, N={ds['n']}, {ds['num_classes']} classes, fingerprint {ds['fingerprint'][:16]}",
        f"views      {a['views']} (seed {a['augmentation']['seed']}, {a['augmentation']['recipe']})",
        f"dtype      {a['dtype']}, block {a['block_rows']} rows",
    ]
    for t, meta in enumerate(a["teachers"]):
        acc = meta.get("test_accuracy")
        lines.append(f"teacher t{t} {meta['arch']} {meta['checkpoint']} sha256 {meta['sha256'][:12]} "
                     f"test top-1 {acc:.2f}%" if acc is not None else f"teacher t{t} {meta['arch']} {meta['checkpoint']}")
    for layer, spec in a["features"].items():
        lines.append(f"features   {layer} (feat[{spec['index']}]) shapes {[tuple(s) for s in spec['shapes']]}")
    sizes = array_sizes(store.path, store.g)
    lines.append("arrays:")
    for name, arr in sorted(_walk_arrays(store.g), key=lambda item: item[0]):
        dims = ",".join(arr.metadata.dimension_names or ())
        lines.append(f"  {name:<34} {str(arr.shape):<24} {str(arr.dtype):<8} [{dims}] {_human(sizes[name])}")
    prog = store.progress()
    done = int(prog.sum())
    lines.append(f"complete   {done}/{prog.size} blocks" + ("" if done == prog.size else
                 f" (views complete: {int((prog.all(axis=1)).sum())}/{prog.shape[0]}; rerun cache-teachers to finish)"))
    lines.append(f"size       {_human(sum(sizes.values()))}")
    return "\n".join(lines)
