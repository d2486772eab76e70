"""The store is the floor: importing it loads nothing above it, and its read side does not load its writer.

Each import runs in a fresh interpreter (this process has imported everything already)."""

from __future__ import annotations

import json
import subprocess
import sys

ABOVE = ("camkd.evaluate", "camkd.methods", "camkd.models", "camkd.teachers", "camkd.fit", "camkd.cli", "camkd.cache",
         "camkd.sources", "camkd.distill", "camkd.train")
WRITE_SIDE = ("camkd.store.writer", "camkd.store.config", "camkd.store.identity", "camkd.store.schema", "camkd.store.space",
              "camkd.store.pipeline", "camkd.store.summary", "camkd.store.plan", "camkd.progress")


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
