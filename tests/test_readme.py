"""The README's commands and examples stay true."""

from __future__ import annotations

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    out = subprocess.run(
        [
            "awk",
            "/<!-- test-command/{found=1; next} found && /^python3 /{print; exit}",
            "README.md",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert "pytest -n auto" in out
    assert out in README
    assert "README.md" in (ROOT / ".ci" / "run").read_text()
