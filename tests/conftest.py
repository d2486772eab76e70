import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import camkd  # noqa: F401 - sets the OpenMP spin default before torch loads, as for the commands

torch.set_num_threads(2)


@pytest.fixture
def cli():
    """Invoke the camkd CLI in-process; returns the click Result (exit_code, output)."""
    from camkd.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke
