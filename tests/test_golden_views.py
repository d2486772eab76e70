"""The views and the sample order are pinned across versions and machines (tests/data/golden_views.json).

A store written by one camkd version is read by the next and a run resumed on another machine: both
rely on (seed, view, index) giving the same crop, flip and pixels, and (seed, epoch) the same order,
everywhere. Only integer results are pinned (see tests/data/golden_views.py); trained weights are
compared between runs made in the same test, never against recorded floats.
"""

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("golden_views", Path(__file__).parent / "data" / "golden_views.py")
golden_views = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden_views)

GOLDEN = json.loads(golden_views.GOLDEN.read_text())
NOW = golden_views.pinned()


def test_every_pinned_value_is_computed():
    assert NOW.keys() == GOLDEN.keys()


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_pinned_value_is_unchanged(name):
    assert NOW[name] == GOLDEN[name], f"{name} changed: stores and runs made before no longer replay; see tests/data/golden_views.py"
