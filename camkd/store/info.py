"""`camkd cache-info`: what a store holds, how big it is, how complete."""

from __future__ import annotations

from pathlib import Path

import camkd.store.topk as topk
from camkd.store.description import StoreDescription, TeacherRecord
from camkd.store.reader import open_store
from camkd.store.sizes import array_sizes, bytes_per_sample_view, human, per_sample_view_text, walk_arrays


def teacher_line(t: int, meta: TeacherRecord) -> str:
    """A teacher's provenance: arch, checkpoint path as given when caching (and the published weights' name), short
    sha256, test accuracy (beside the published top-1 where the weights' library reports one)."""
    acc = meta.test_accuracy  # None: created with --no-eval
    acc_text = f"test top-1 {acc:.2f}%" if acc is not None else "test accuracy not evaluated"
    if meta.published_accuracy is not None:  # the library's figure is over ImageNet-1k's 1000 classes
        acc_text += f", published top-1 {meta.published_accuracy:.2f}%" + (" (on ImageNet-1k)" if meta.class_rows else "")
    weights = f" ({meta.weights})" if meta.weights else ""
    kept = f" 1000 ImageNet-1k outputs restricted to the data's {len(meta.class_rows)} classes," if meta.class_rows else ""
    return f"teacher t{t} {meta.arch}{weights} {meta.path} sha256 {meta.sha256[:12]}{kept} {acc_text}"


def logits_line(spec: topk.LogitsSpec, num_classes: int) -> str:
    if spec.kind == "dense":
        return f"logits     dense ({num_classes} classes)"
    return (f"logits     top-{spec.k} of {num_classes} classes per teacher, exact CE/entropy, logsumexp and tail at "
            f"--kd-T {', '.join(f'{t:g}' for t in spec.temperatures)}")


def tf32_line(d: StoreDescription) -> str:
    """Whether the teachers' float32 convolutions and matmuls ran in TF32 (cache-verify's float32 tolerance follows)."""
    ops = d.tf32_ops
    if d.teacher_tf32 is None:
        return "tf32       not recorded (a store from before it was): taken as off, float32 throughout"
    if not any(ops.values()):
        return "tf32       off: the teachers' convolutions and matmuls ran in float32 throughout"
    on = " and ".join(w for op, w in (("conv", "convolutions"), ("matmul", "matmuls")) if ops[op])
    off = " and ".join(w for op, w in (("conv", "convolutions"), ("matmul", "matmuls")) if not ops[op])
    return (f"tf32       on for {on}{f', off for {off}' if off else ''}: float32 outputs to ~10 mantissa bits "
            "(cache-verify's tolerance allows for it)")


def cache_info(path: str | Path) -> str:
    """A human-readable report of attrs, arrays and completeness."""
    store = open_store(path)
    d = store.description
    ds = d.dataset
    lines = [
        f"store      {store.path} (format {d.format_version}, camkd {d.camkd_version})",
        f"dataset    {ds.name} {ds.split}, N={ds.n}, {ds.num_classes} classes, fingerprint {ds.fingerprint[:16]}",
        f"views      {d.views} (seed {d.augmentation['seed']}, {d.augmentation['recipe']})",
        f"dtype      {d.dtype}, features {d.feature_dtype}"
        + (f" ({d.feature_scale})" if d.feature_scale else "")
        + f", compressor {d.compressor}, block {d.block_rows} rows",
    ]
    lines.append(logits_line(d.logits, ds.num_classes))
    lines.append(f"teachers   ran in {d.precision}{', channels-last' if d.channels_last else ''} (--precision)")
    lines.append(tf32_line(d))
    for T, stats in (d.topk_tail_mass or {}).items():
        lines.append(f"tail mass  at T={T} per teacher: mean " + ", ".join(f"{x:.2e}" for x in stats["mean"])
                     + "; p99 " + ", ".join(f"{x:.2e}" for x in stats["p99"]) + "; max " + ", ".join(f"{x:.2e}" for x in stats["max"]))
    lines += [teacher_line(t, meta) for t, meta in enumerate(d.teachers)]
    for layer, spec in d.features.items():
        lines.append(f"features   {layer} (feat[{spec.index}]) shapes {list(spec.shapes)}")
    if not d.features:
        lines.append("features   none")
    sizes = array_sizes(store.g)
    lines.append("arrays:")
    for name, arr in sorted(walk_arrays(store.g), key=lambda item: item[0]):
        dims = ",".join(arr.metadata.dimension_names or ())
        lines.append(f"  {name:<34} {str(arr.shape):<24} {str(arr.dtype):<8} [{dims}] {human(sizes[name])}")
    prog = store.progress()
    done = int(prog.sum())
    lines.append(f"complete   {done}/{prog.size} blocks" + ("" if done == prog.size else
                 f" (views complete: {int((prog.all(axis=1)).sum())}/{prog.shape[0]}; rerun cache-teachers to finish)"))
    per = bytes_per_sample_view(store.g, sizes, store.n, store.views)
    lines.append(f"per sample-view {per_sample_view_text(per)}")
    lines.append(f"size       {human(sum(sizes.values()))}")
    return "\n".join(lines)
