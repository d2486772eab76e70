"""The store is the floor: importing it loads nothing above it, and its read side does not load its writer.

Each import runs in a fresh interpreter (this process has imported everything already)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ABOVE = ("camkd.evaluate", "camkd.methods", "camkd.models", "camkd.teachers", "camkd.fit", "camkd.job", "camkd.trainee",
         "camkd.epoch_plan", "camkd.cli", "camkd.cli_bench", "camkd.cli_shared", "camkd.cache", "camkd.sources",
         "camkd.distill", "camkd.train", "camkd.report", "camkd.output")
WRITE_SIDE = ("camkd.store.writer", "camkd.store.config", "camkd.store.identity", "camkd.store.schema", "camkd.store.space",
              "camkd.store.pipeline", "camkd.store.summary", "camkd.store.plan", "camkd.progress")


STORE_DIR = Path(__file__).resolve().parents[1] / "camkd" / "store"
READ_SIDE = ("camkd.store", "camkd.store.reader", "camkd.store.info", "camkd.store.verify", "camkd.store.stage")


def loaded_by(modules: tuple[str, ...]) -> set[str]:
    """The camkd modules a fresh interpreter has loaded after importing ``modules`` (what loads with all of them
    together is the union of what loads with each)."""
    code = f"import json, sys, {', '.join(modules)}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('camkd'))))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(r.stdout))


def _under(names: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in packages))


def test_the_store_loads_nothing_above_it():
    loaded = loaded_by(READ_SIDE + ("camkd.store.writer",))
    assert _under(loaded, ABOVE) == []
    assert "camkd.store.pipeline" in loaded  # the check sees the writer's modules


def test_the_read_side_does_not_load_the_writer():
    loaded = loaded_by(READ_SIDE)
    assert _under(loaded, ABOVE + WRITE_SIDE) == []
    assert "camkd.store.verify" in loaded and "camkd.store.layout" in loaded


# -- the layer table: which module of the store may import which ------------------------------------
# A module imports only store modules of lower layers (so the store has no import circle) and, from outside the
# store, only what lies below it (OUTSIDE). Every import counts, at module level or inside a function.
LAYERS = (
    ("topk", "location", "runner", "viewcheck"),  # the logits' math, where a store is, what it needs of the teachers,
    # the check of replayed views against the recorded ones
    ("layout",),  # array names, chunking and the format
    ("arrays", "config", "description", "differences", "sizes"),  # array specs; options; the typed attrs; sizes
    ("plan", "reader"),  # the planned size; reading a store
    ("schema", "space", "stage", "info", "summary", "pipeline", "verify"),  # creating, checking space, staging, reports
    ("identity",),  # which store a run continues, creating it
    ("writer",),  # the steps of cache-teachers
)
OUTSIDE = ("camkd", "camkd.data", "camkd.errors", "camkd.words", "camkd.progress", "camkd.dist")
PUBLIC = {"__init__": {"camkd.store.reader"}}  # the package re-exports the read side's API (README's Python API)


def _layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if module in names)


def _imports(path: Path) -> tuple[set[str], bool]:
    """The camkd modules ``path`` imports (``from P import m``, m a module file: P.m), and whether it reads names
    from the package camkd.store itself (whose __init__ imports the reader)."""
    root = Path(__file__).resolve().parents[1]
    out, through_package = set(), False
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "camkd"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "camkd":
            through_package |= node.module == "camkd.store"
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (root / Path(*sub.split("."))).with_suffix(".py").exists() or (root / Path(*sub.split("."))).is_dir()
                out.add(sub if is_module else node.module)
    return out, through_package


def test_the_layer_table_lists_every_store_module():
    listed = [m for names in LAYERS for m in names]
    assert len(listed) == len(set(listed))
    assert sorted(listed + list(PUBLIC)) == sorted(p.stem for p in STORE_DIR.glob("*.py"))


def test_store_modules_import_only_lower_layers_and_what_lies_below():
    wrong = []
    for path in sorted(STORE_DIR.glob("*.py")):
        module = path.stem
        imports, through_package = _imports(path)
        if module in PUBLIC:
            assert imports == PUBLIC[module], module
            continue
        if through_package:
            wrong.append(f"{module}: 'from camkd.store import ...' goes through the package __init__ (which imports the "
                         "reader): import the submodule itself")
        for name in sorted(imports):
            if name.startswith("camkd.store."):
                other = name.removeprefix("camkd.store.")
                if _layer(other) >= _layer(module):
                    wrong.append(f"{module} (layer {_layer(module)}) imports {other} (layer {_layer(other)})")
            elif not any(name == o or name.startswith(o + ".") for o in OUTSIDE if o != "camkd") and name != "camkd":
                wrong.append(f"{module} imports {name}, which is not below the store")
    assert wrong == []
