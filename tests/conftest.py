import pytest
import torch
from typer.testing import CliRunner

torch.set_num_threads(2)


@pytest.fixture
def cli():
    """Invoke the camkd CLI in-process; returns the click Result (exit_code, output)."""
    from camkd.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke
