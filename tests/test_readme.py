"""The README's two commands: CI runs the test command verbatim, and the main job's command exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = bash_blocks((ROOT / "README.md").read_text())
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), "the README's test command and .ci/run disagree"


def test_main_job_command_runs_the_demo():
    blocks = bash_blocks((ROOT / "README.md").read_text())
    assert blocks[0].endswith("camkd demo") and "apt-get install -y dataset-fashion-mnist" in blocks[0]
