# ruff: noqa: I001 - camkd is imported first on purpose
import os

import camkd  # noqa: F401 - sets the OpenMP spin default before torch loads, as for the commands

import pytest
import torch
from typer.testing import CliRunner

# under pytest-xdist (-n 2) each worker gets one thread, so two workers share the 2 cores without oversubscribing
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture
def cli():
    """Invoke the camkd CLI in-process; returns the click Result (exit_code, output)."""
    from camkd.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke
