# ruff: noqa: I001 - camkd is imported first on purpose
import os

import camkd  # noqa: F401 - sets the OpenMP spin default before torch loads, as for the commands

import re

import pytest
import torch
from typer.testing import CliRunner

# the fixtures several test files share: the store's (two tiny teachers, the round-trip and CLI stores, uninterrupted
# runs) and the image folder, made once per session (per xdist worker), imported here so that each is made once
from folder_helpers import folder  # noqa: F401
from store_helpers import rt, small, teachers, uninterrupted  # noqa: F401

# under pytest-xdist (-n 2) each worker gets one thread, so two workers share the 2 cores without oversubscribing
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are collected everywhere and skipped where no CUDA device is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none available here)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def cli():
    """Invoke the camkd CLI in-process; returns the click Result (exit_code, output)."""
    from camkd.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def assert_one_error(result, pattern: str) -> str:
    """Bad input's contract: exit code 2, no traceback, exactly one non-empty line, starting with 'error: ' and
    matching ``pattern`` (a regular expression); returns that line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture
def one_error():
    """``one_error(result, pattern)``: assert_one_error as a fixture (the one CLI-error check of the suite)."""
    return assert_one_error


@pytest.fixture
def interrupted_creation(monkeypatch):
    """Until ``.restore()``, creating a Zarr array stops the third time with KeyboardInterrupt (what a kill while
    creating a store leaves: some arrays made, no attrs); ``.calls`` counts the attempts."""
    from types import SimpleNamespace

    import zarr

    real, calls = zarr.Group.create_array, []

    def dies_on_third_array(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(zarr.Group, "create_array", dies_on_third_array)
    return SimpleNamespace(calls=calls, restore=lambda: monkeypatch.setattr(zarr.Group, "create_array", real))
