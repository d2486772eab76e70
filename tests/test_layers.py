"""The import graph of camkd/: no circle, and no import from a lower layer to a higher one.

Read from the sources (every import, at module level or inside a function; ``from P import m`` with m a module counts
as importing P.m), so it needs no import to run and sees imports a function hides. The store's own finer table is
tests/test_store_imports.py."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each top-level module or package of camkd/, by layer: a module may import its own layer and those below.
LAYERS = (
    ("camkd", "errors", "words", "registry", "config", "device", "dist", "progress", "checkpoint", "precision", "output",
     "runs"),  # vocabulary and plumbing: nothing about data, models or stores
    ("data",),  # datasets, splits, views, the counter hash
    ("store",),  # the Zarr store: layout, description, reading, writing
    ("models", "methods", "epoch_plan", "weights", "classmap"),  # networks; losses (top-k KL reads the store's logits
    # spec); an epoch's batches; published weights by name; ImageNet-1k teachers on ImageNet subsets
    ("teachers", "memory", "evaluate", "job", "trainee"),  # teachers run; memory checks; evaluation; a job's setup
    ("sources",),  # teacher outputs while training: none, a store, live teachers
    ("fit",),  # the one loop
    ("train", "cache", "report"),  # the jobs and the report
    ("distill", "demo"),  # distillation (its recipe is train's), the demo (every job)
    ("bench",),  # the benchmarks
    ("cli_shared", "cli_bench", "cli"),  # the command line
)


def _modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "camkd").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names}
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "camkd"


def _layer(group: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if group in names)


def test_the_table_lists_every_module():
    groups = {_group(m) for m in MODULES}
    listed = {g for names in LAYERS for g in names}
    assert groups == listed, (groups - listed, listed - groups)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def _upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return [(m, w) for m, ws in graph.items() for w in ws if _layer(_group(w)) > _layer(_group(m))]


def test_no_import_goes_up_a_layer():
    assert _upward(GRAPH) == []


def test_no_import_circle():
    assert _circles(GRAPH) == []


def test_the_checks_see_a_circle_and_an_upward_import():
    """Both checks can fail: a made-up import of the loop by the data goes up and closes a circle (fit imports data)."""
    graph = {m: set(ws) for m, ws in GRAPH.items()}
    graph["camkd.data.base"].add("camkd.fit")
    assert ("camkd.data.base", "camkd.fit") in _upward(graph)
    assert any({"camkd.data.base", "camkd.fit"} <= set(c) for c in _circles(graph))


def test_report_imports_nothing_from_bench():
    assert not any(_group(w) == "bench" for w in GRAPH["camkd.report"])
