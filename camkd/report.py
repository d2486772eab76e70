"""`camkd report`: run folders (train-teacher or distill) -> one table; with --out PREFIX also PREFIX.json, .md, .png.

A run folder holds ``metrics.jsonl`` (one record per epoch, written by :mod:`camkd.fit`) and
``last.pth`` / ``best.pth``, whose meta holds the run's whole config. Every number in the table
is read from ``metrics.jsonl``; the config only names the run (arch, method, seed) and decides
grouping. Nothing here loads data or runs a model.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from camkd.errors import CamkdError
from camkd.output import new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Where a run ran or how it was named: not part of what was trained, so ignored by --group (with the seeds).
_RUN_ONLY = {"run": ("seed", "out", "resume", "auto_resume", "progress", "device"), "data": ("data_dir", "download")}
_TOP_ONLY = ("aug_seed", "trial", "teachers")  # teachers: the paths as given; the checkpoints' sha256 stay in the key
STATS = ("final_top1", "best_top1", "final_top5", "final_train_loss", "images_per_s")


def _records(metrics: Path) -> list[dict]:
    lines = metrics.read_text().splitlines()
    if not any(line.strip() for line in lines):
        raise CamkdError(f"{metrics} is empty: the run has not finished an epoch yet")
    by_epoch: dict[int, dict] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CamkdError(f"{metrics} line {i} is not JSON ({e.msg}); the file is damaged") from None
        if not isinstance(rec, dict) or not all(k in rec for k in ("epoch", "test_top1", "train_loss")):
            raise CamkdError(f"{metrics} line {i} is not a camkd epoch record (no epoch, test_top1 or train_loss)")
        by_epoch[int(rec["epoch"])] = rec  # a resumed run rewrites the epochs it redoes: the last line wins
    return [by_epoch[e] for e in sorted(by_epoch)]


def _is_run(p: Path) -> bool:
    return (p / "metrics.jsonl").is_file()


def expand(paths: list[str | Path]) -> list[Path]:
    """The run folders: each path itself, or, for a folder holding no run, the run folders directly inside it."""
    out: list[Path] = []
    for given in paths:
        p = Path(given)
        if not p.exists():
            raise CamkdError(f"{p} does not exist; give run folders made by train-teacher or distill")
        if p.is_file():
            hint = f" (for a checkpoint: camkd evaluate {p})" if p.suffix == ".pth" else ""
            raise CamkdError(f"{p} is a file, not a run folder; give the folder that holds metrics.jsonl{hint}")
        found = [p] if _is_run(p) else sorted(c for c in p.iterdir() if c.is_dir() and _is_run(c))
        if not found:
            raise CamkdError(f"{p} is not a run folder (no metrics.jsonl in it or in its subfolders); give folders made "
                             "by train-teacher or distill")
        for f in found:
            if any(f.resolve() == o.resolve() for o in out):
                raise CamkdError(f"run {f} is given twice")
            out.append(f)
    return out


def load_run(path: str | Path) -> dict:
    """One run: its config (from last.pth, else best.pth) and per-epoch records, summarized."""
    from camkd.checkpoint import load_checkpoint

    p = Path(path)
    records = _records(p / "metrics.jsonl")
    ckpt_path = next((c for c in (p / "last.pth", p / "best.pth") if c.is_file()), None)
    if ckpt_path is None:
        raise CamkdError(f"{p} has metrics.jsonl but no last.pth or best.pth, so its config is unknown")
    meta = load_checkpoint(ckpt_path).get("meta") or {}
    if "arch" not in meta or "options" not in meta:
        raise CamkdError(f"{ckpt_path} holds no camkd meta (arch, options); {p} is not a camkd run folder")
    opts = meta["options"]
    last = records[-1]
    best = max(records, key=lambda r: r["test_top1"])  # the first epoch reaching the best, as fit keeps best.pth
    teacher = "trial" in opts  # TrainConfig; a DistillConfig has a method and a source
    precision = (opts.get("run") or {}).get("precision", "fp32")  # other than fp32: named beside the method
    row = {
        "run": str(path), "kind": "teacher" if teacher else "student",
        "method": meta.get("method", "ce") + ("" if teacher else " (online)" if opts.get("online") else "")
        + ("" if precision == "fp32" else f" [{precision}]"),
        "arch": meta["arch"], "dataset": meta.get("dataset"), "seed": (opts.get("run") or {}).get("seed"),
        "epochs_done": int(last["epoch"]), "epochs_planned": (opts.get("optim") or {}).get("epochs"),
        "final_top1": last["test_top1"], "best_top1": best["test_top1"], "best_epoch": int(best["epoch"]),
        "final_top5": last.get("test_top5"), "final_train_loss": last["train_loss"], "final_test_loss": last.get("test_loss"),
        "images_per_s": statistics.median(r["images_per_s"] for r in records) if all("images_per_s" in r for r in records)
        else None,
        "teacher_weights": last.get("teacher_weights"), "inter_weights": last.get("inter_weights"),
        "group_key": _group_key(meta, int(last["epoch"])), "history": records,
    }
    return row


def _group_key(meta: dict, epochs_done: int) -> str:
    opts = json.loads(json.dumps(meta["options"]))  # a deep copy
    for part, keys in _RUN_ONLY.items():
        for k in keys:
            (opts.get(part) or {}).pop(k, None)
    for k in _TOP_ONLY:
        opts.pop(k, None)
    ident = {k: meta.get(k) for k in ("arch", "method", "dataset", "dataset_fingerprint", "num_classes", "teachers")}
    return json.dumps({"meta": ident, "options": opts, "epochs_done": epochs_done}, sort_keys=True)


def _mean_std(values: list[float | None]) -> dict | None:
    if any(v is None for v in values):
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def group_runs(rows: list[dict]) -> list[dict]:
    """Runs with the same group key (config but seeds), in order of first appearance: mean and sample std (n - 1)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group_key"], []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        g = {"label": f"{first['arch']} {first['method']}", "kind": first["kind"], "method": first["method"],
             "arch": first["arch"], "dataset": first["dataset"], "n": len(members), "runs": [m["run"] for m in members],
             "seeds": [m["seed"] for m in members], "epochs_done": first["epochs_done"],
             "epochs_planned": first["epochs_planned"], **{s: _mean_std([m[s] for m in members]) for s in STATS}}
        for key in ("teacher_weights", "inter_weights"):
            ws = [m[key] for m in members]
            g[key] = [statistics.fmean(col) for col in zip(*ws)] if all(ws) and len({len(w) for w in ws}) == 1 else None
        out.append(g)
    keys = list(groups)
    for label in {g["label"] for g in out}:
        same = [i for i, g in enumerate(out) if g["label"] == label]
        if len(same) > 1:  # groups that look alike: name what sets them apart
            for i, text in zip(same, _what_differs([keys[i] for i in same])):
                out[i]["label"] += f" ({text})"
    return out


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def _what_differs(group_keys: list[str], most: int = 2) -> list[str]:
    """Per group, the settings in which groups of one label differ, as options: ``--cache dense.zarr, epochs 2``."""
    flat = [_flat(json.loads(k)) for k in group_keys]
    differ = sorted(k for k in set().union(*flat) if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1)

    def name(key: str) -> str:
        last = key.rsplit(".", 1)[-1]
        return "epochs" if last == "epochs_done" else "--" + last.replace("_", "-")

    def value(v) -> str:
        text = Path(v).name if isinstance(v, str) and "/" in v else json.dumps(v) if not isinstance(v, str) else v
        return text if len(text) <= 24 else text[:21] + "..."

    texts = []
    for f in flat:
        parts = [f"{name(k)} {value(f.get(k))}" for k in differ[:most]]
        texts.append(", ".join(parts) + (", ..." if len(differ) > most else ""))
    return texts


def report(paths: list[str | Path], *, group: bool = False) -> dict:
    """The report of the run folders in ``paths`` (see :func:`expand`); with ``group`` also the seed groups."""
    if not paths:
        raise CamkdError("give at least one run folder")
    rows = [load_run(p) for p in expand(paths)]
    r: dict = {"runs": [{k: v for k, v in x.items() if k != "group_key"} for x in rows]}  # the key only groups
    if group:
        r["groups"] = group_runs(rows)
    return r


def short_names(paths: list[str]) -> list[str]:
    """Each path's shortest suffix of folders that no other path ends with (``runs/a/s0``, ``runs/b/s0`` -> ``a/s0``,
    ``b/s0``): the runs' names in the plot's legends."""
    parts = [Path(p).parts for p in paths]
    out = []
    for i, mine in enumerate(parts):
        others = [q for j, q in enumerate(parts) if j != i]
        k = next((k for k in range(1, len(mine) + 1) if all(q[-k:] != mine[-k:] for q in others)), len(mine))
        out.append(str(Path(*mine[-k:])) if mine else str(paths[i]))
    return out


def _f(v, fmt: str = ".2f") -> str:
    return "" if v is None else format(v, fmt)


def _w(ws: list[float] | None) -> str:
    return "" if not ws else " / ".join(f"{w:.3f}" for w in ws)


def _ms(s: dict | None, fmt: str = ".2f") -> str:
    if s is None:
        return ""
    return format(s["mean"], fmt) + ("" if s["std"] is None else " ± " + format(s["std"], fmt))


def to_markdown(r: dict) -> str:
    rows = r["runs"]
    inter = any(x["inter_weights"] for x in rows)
    head = ["run", "method", "arch", "seed", "epochs", "final top-1", "best top-1 (epoch)", "final top-5",
            "final train loss", "images/s", "teacher weights"] + (["inter weights"] if inter else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in rows:
        cells = [x["run"], x["method"], x["arch"], str(x["seed"]), f"{x['epochs_done']}/{x['epochs_planned']}",
                 _f(x["final_top1"]), f"{_f(x['best_top1'])} ({x['best_epoch']})", _f(x["final_top5"]),
                 _f(x["final_train_loss"], ".4f"), _f(x["images_per_s"], ".0f"), _w(x["teacher_weights"])]
        lines.append("| " + " | ".join(cells + ([_w(x["inter_weights"])] if inter else [])) + " |")
    lines += ["", "Top-1/top-5: test split, percent; images/s: median over the epochs; teacher weights: each teacher's "
              "mean share over the last epoch (camkd: logit level; inter: feature level)."]
    if "groups" in r:
        head = ["group", "runs", "seeds", "epochs", "final top-1", "best top-1", "final top-5", "final train loss",
                "images/s", "teacher weights"] + (["inter weights"] if inter else [])
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in r["groups"]:
            cells = [g["label"], str(g["n"]), ", ".join(str(s) for s in g["seeds"]), f"{g['epochs_done']}/{g['epochs_planned']}",
                     _ms(g["final_top1"]), _ms(g["best_top1"]), _ms(g["final_top5"]), _ms(g["final_train_loss"], ".4f"),
                     _ms(g["images_per_s"], ".0f"), _w(g["teacher_weights"])]
            lines.append("| " + " | ".join(cells + ([_w(g["inter_weights"])] if inter else [])) + " |")
        lines += ["", "Groups: mean ± sample standard deviation over the runs (no ± for one run)."]
    return "\n".join(lines)


def plot(r: dict) -> Figure:
    """Test top-1 and train loss per epoch per run; each run's per-teacher weights per epoch where logged.

    Every panel spans the runs' epochs with half an epoch either side (one epoch is a point at its
    number, not a range of fractions) and names each run by its folder's shortest unique suffix."""
    from matplotlib.ticker import MaxNLocator

    rows = r["runs"]
    panels = ["test_top1", "train_loss"] + [k for k in ("teacher_weights", "inter_weights")
                                            if any(k in e for x in rows for e in x["history"])]
    titles = {"test_top1": "test top-1 (%)", "train_loss": "train loss", "teacher_weights": "teacher weights (logit level)",
              "inter_weights": "teacher weights (feature level)"}
    epochs = [e["epoch"] for x in rows for e in x["history"]]
    names = short_names([x["run"] for x in rows])
    marker = "o" if max(epochs) - min(epochs) < 30 else None
    cols = 2
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = new_figure(nrows, cols, (7 * cols, 4.2 * nrows))
    styles = ["-", "--", ":", "-."]
    for ax, key in zip(axes.flat, panels):
        for i, (x, name) in enumerate(zip(rows, names)):
            hist = [e for e in x["history"] if key in e]
            if not hist:
                continue
            ep = [e["epoch"] for e in hist]
            if key in ("teacher_weights", "inter_weights"):
                for t in range(len(hist[0][key])):
                    ax.plot(ep, [e[key][t] for e in hist], styles[t % len(styles)], color=f"C{i % 10}", marker=marker,
                            markersize=4, label=f"{name} t{t}")
            else:
                ax.plot(ep, [e[key] for e in hist], color=f"C{i % 10}", marker=marker, markersize=4, label=name)
        ax.set_title(titles[key])
        ax.set_xlabel("epoch")
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, even for one
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return fig
