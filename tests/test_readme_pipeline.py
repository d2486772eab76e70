"""The README's CIFAR-100 pipeline, its commands as written, run end to end: what a user assumes of it holds.

The commands are read from README.md's section "## The pipeline on CIFAR-100, step by step" (its bash block), so this
test follows the README when it changes. Only what makes them affordable here is substituted:

- the dataset: CIFAR-100 (not available offline) -> ``synthetic`` at 16 px, its first 32 training samples (``-d``,
  ``--data-dir`` and every path that names the dataset);
- sizes: the teachers' arch resnet32x4 -> resnet8 (also in the paths that name it), 2 views instead of 240, batch 16;
- epochs: 1 per teacher, 2 per student (so the second view and CA-MKD's feature term, skipped in epoch 1, run).

Everything else runs as written, in a fresh folder (the default ``runs/`` and ``cache/`` land there): the ``for t in
0 1 2`` loop as three train-teacher calls that differ only by ``--trial``, cache-teachers with the default features,
both distill commands from the one store, and report. Asserted: the three teachers' weights differ pairwise (``--trial``
seeds the run; it once only named the folder, issue 22), the store serves both students' methods, both students train
their epochs, report lists both, and ``camkd evaluate RUN/last.pth --json`` equals each student's last test metrics.
"""

import itertools
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## The pipeline on CIFAR-100, step by step"

DATA = ("--image-size", "16", "--limit", "32")  # added where the README names the dataset (train-teacher, cache-teachers)
RENAMES = {"cifar100": "synthetic", "resnet32x4": "resnet8"}  # in every argument: options and the paths named after them
TEACHER_EPOCHS, STUDENT_EPOCHS, VIEWS, BATCH = 1, 2, 2, 16


def readme_commands() -> list[list[str]]:
    """The section's bash block(s) as argument lists: comments dropped, continuation lines joined, the one-line ``for V
    in A B C; do CMD; done`` loop unrolled into one command per value."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION) + len(SECTION)
    end = text.find("\n## ", start)
    blocks = re.findall(r"```bash\n(.*?)```", text[start:end if end >= 0 else None], flags=re.S)
    assert blocks, f"no bash block under {SECTION!r}"
    commands = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            loop = re.fullmatch(r"for (\w+) in ([^;]+); do (.+?);? done", line)
            if loop:
                var, values, body = loop.groups()
                commands += [shlex.split(body.replace(f"${var}", v)) for v in values.split()]
            else:
                commands.append(shlex.split(line))
    return commands


def _option(args: list[str], *names: str) -> str | None:
    for i, a in enumerate(args[:-1]):
        if a in names:
            return args[i + 1]
    return None


def _set(args: list[str], names: tuple[str, ...], value: str) -> list[str]:
    """``args`` with option ``names[0]`` (or an alias) set to ``value``: replaced where given, else appended."""
    for i, a in enumerate(args[:-1]):
        if a in names:
            return args[:i + 1] + [value] + args[i + 2:]
    return args + [names[0], value]


def shrink(args: list[str]) -> list[str]:
    """One README command with only the dataset, sizes and epochs substituted."""
    assert args[0] == "camkd", args
    args = args[1:]
    for old, new in RENAMES.items():
        args = [a.replace(old, new) for a in args]
    if "--data-dir" in args:  # synthetic data have no files
        i = args.index("--data-dir")
        args = args[:i] + args[i + 2:]
    command = args[0]
    if command == "train-teacher":
        args = _set(_set(args + list(DATA), ("--epochs",), str(TEACHER_EPOCHS)), ("--batch-size",), str(BATCH))
    elif command == "cache-teachers":
        args = _set(_set(args + list(DATA), ("--views", "-V"), str(VIEWS)), ("--batch-size",), str(BATCH))
    elif command == "distill":
        args = _set(_set(args, ("--epochs",), str(STUDENT_EPOCHS)), ("--batch-size",), str(BATCH))
    return args


def test_the_readme_commands_are_what_this_test_expects():
    """The shape the pipeline test relies on: three teachers differing only by --trial, one store, two students from
    it, one report; a README that changes this shape fails here first, with the commands shown."""
    commands = readme_commands()
    names = [c[1] for c in commands]
    assert names == ["train-teacher"] * 3 + ["cache-teachers"] + ["distill"] * 2 + ["report"], commands
    teachers = commands[:3]
    assert [_option(c, "--trial") for c in teachers] == ["0", "1", "2"], teachers
    assert all(_option(c, "--seed") is None and _option(c, "--aug-seed") is None for c in teachers), teachers
    without_trial = [[a for i, a in enumerate(c) if a != "--trial" and c[i - 1] != "--trial"] for c in teachers]
    assert without_trial[0] == without_trial[1] == without_trial[2]


@pytest.fixture
def pipeline(cli, tmp_path, monkeypatch):
    """Every README command, shrunk, run in order in a fresh folder; their results by position."""
    monkeypatch.chdir(tmp_path)
    results = []
    for args in map(shrink, readme_commands()):
        r = cli(*args)
        assert r.exit_code == 0, f"camkd {shlex.join(args)}\n{r.output}"
        results.append((args, r.output))
    return results


def _paths(args: list[str], *names: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in names]


def _last_metrics(run: Path) -> dict:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]


def test_the_readme_pipeline(cli, pipeline, tmp_path):
    (cache_args, cache_out), students, (report_args, report_out) = pipeline[3], pipeline[4:6], pipeline[6]

    # 1. three teachers, and they differ: every pair has some weight tensor that is not equal
    teachers = [Path(p) for p in _paths(cache_args, "-t", "--teacher")]
    assert len(teachers) == 3 and all(p.is_file() for p in teachers), teachers
    models = [torch.load(p, weights_only=False)["model"] for p in teachers]
    for (i, a), (j, b) in itertools.combinations(enumerate(models), 2):
        assert list(a) == list(b)
        assert not all(torch.equal(a[k], b[k]) for k in a), f"teachers {i} and {j} have equal weights"
    seeds = [torch.load(p, weights_only=False)["meta"]["options"]["run"]["seed"] for p in teachers]
    assert seeds == [0, 1, 2]

    # 2. the one store serves both students' methods (cache-teachers' last line names them)
    store = Path(_option(cache_args, "-o", "--out"))
    assert (store / "zarr.json").is_file()
    served = re.search(r"^serves --method ([^;\n]+)", cache_out, flags=re.M)
    assert served, cache_out
    methods = [_option(args, "--method") for args, _ in students]
    assert len(set(methods)) == 2 and set(methods) <= set(served.group(1).split(", ")), (methods, served.group(1))

    # 3. both students trained from that store, their epochs, into their own run folders
    runs = sorted((tmp_path / "runs" / "students").iterdir())
    assert len(runs) == 2, runs
    for args, _ in students:
        assert Path(_option(args, "-c", "--cache")) == store
    by_method = {}
    for run in runs:
        meta = torch.load(run / "last.pth", weights_only=False)["meta"]
        by_method[meta["method"]] = run
        assert meta["epoch"] == STUDENT_EPOCHS
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == list(range(1, STUDENT_EPOCHS + 1)), run
        assert [r["view"] for r in records] == [(e - 1) % VIEWS for e in range(1, STUDENT_EPOCHS + 1)], run
        losses = [v for r in records for k, v in r.items() if k.startswith("loss_") or k == "train_loss"]
        assert all(torch.isfinite(torch.tensor(v)) for v in losses), records
        if meta["method"] == "camkd":  # its feature term, skipped in epoch 1, ran in epoch 2
            assert records[0]["loss_inter"] == 0 and records[1]["loss_inter"] > 0, records
    assert sorted(by_method) == sorted(methods)
    run_method = {run: method for method, run in by_method.items()}

    # 4. report lists both students (and wrote its --out files)
    for run in runs:  # a table row per student: its folder and its method
        assert re.search(rf"^\|[^|\n]*{re.escape(run.name)} \| {re.escape(run_method[run])} \|", report_out, flags=re.M), \
            report_out
    prefix = Path(_option(report_args, "--out"))
    assert all(prefix.with_suffix(s).is_file() for s in (".json", ".md", ".png"))

    # evaluate of each student's last.pth gives its own last test metrics
    for run in runs:
        r = cli("evaluate", run / "last.pth", "--json")
        assert r.exit_code == 0, r.output
        got, rec = json.loads(r.output), _last_metrics(run)
        assert got["epoch"] == rec["epoch"] == STUDENT_EPOCHS
        assert got["top1"] == rec["test_top1"] and got["top5"] == rec["test_top5"], (run.name, got, rec)
        assert got["loss"] == pytest.approx(rec["test_loss"], rel=1e-6, abs=0), (run.name, got, rec)
