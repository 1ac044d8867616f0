"""The README's commands and examples stay true: every Python block runs as written (one
test each, named after its section), the tour's shell session runs against an astrad of
this checkout, and no block of the tour goes untested.

Markers (an HTML comment on the line before a block):

- ``<!-- requires: astra.Agent.shared_memory astra.Client.memory -->``: the block needs
  those attributes; it is skipped, saying so, until they exist.
- ``<!-- test: ... -->`` before a ``sh`` block: this file runs the block with bash, with
  ``astra``/``astrad`` of this checkout first on PATH and a state directory of its own.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import stat
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

#: A fenced block, with the marker comment on the line before it, if any.
_BLOCK = re.compile(r"(?:<!-- (?P<marker>[^\n]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
_TOUR = "## A 5-minute tour"


def _blocks() -> list[tuple[str, str, str, str, int]]:
    """(section heading, language, marker, code, line) of every fenced block."""
    out = []
    for match in _BLOCK.finditer(README):
        before = README[: match.start()]
        heading = re.findall(r"^#{2,3} (.+)$", before, re.M)
        line = before.count("\n") + 2
        out.append((heading[-1] if heading else "", match["lang"], match["marker"] or "",
                    match["code"], line))  # fmt: skip
    return out


def _in_tour(line: int) -> bool:
    start = README.index(_TOUR)
    end = README.index("\n## ", start + len(_TOUR))
    return README[:start].count("\n") < line < README[:end].count("\n")


def _slug(heading: str, line: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") + f"-L{line}"


PYTHON = [b for b in _blocks() if b[1] == "python"]
SHELL_TESTED = [b for b in _blocks() if b[1] == "sh" and b[2].startswith("test:")]


def _missing(marker: str) -> str | None:
    """The first attribute a ``requires:`` marker names that does not exist, else None."""
    if not marker.startswith("requires:"):
        return None
    for path in marker.split(":", 1)[1].split():
        module, _, attrs = path.partition(".")
        obj: object = importlib.import_module(module)
        for attr in attrs.split("."):
            if not hasattr(obj, attr):
                return path
            obj = getattr(obj, attr)
    return None


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("marker", "code", "line"), [b[2:] for b in PYTHON], ids=[_slug(b[0], b[4]) for b in PYTHON]
)
def test_readme_python_example_runs(marker, code, line):
    missing = _missing(marker)
    if missing:
        pytest.skip(f"README.md line {line} needs {missing}, which is not built yet")
    exec(compile(code, f"README.md:{line}", "exec"), {})


def test_every_block_of_the_tour_is_tested():
    tour = [b for b in _blocks() if _in_tour(b[4])]
    assert {b[0] for b in tour} >= {
        "1. Tasks on an embedded kernel",
        "2. Task graphs",
        "3. Agents",
        "4. Tools in sandboxes",
        "5. Memory",
        "6. Watching it: `astra top`",
    }
    untested = [b[4] for b in tour if b not in PYTHON and b not in SHELL_TESTED]
    assert not untested, f"README.md blocks in the tour that no test runs, at lines {untested}"


_SHIM = """#!/bin/sh
exec "{python}" -c 'import sys; from astra._cli import {entry}; sys.exit({entry}())' "$@"
"""


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("code", "line"), [b[3:] for b in SHELL_TESTED], ids=[_slug(b[0], b[4]) for b in SHELL_TESTED]
)
def test_readme_shell_session_runs(code, line, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, entry in (("astra", "main"), ("astrad", "astrad_main")):
        shim = bin_dir / name
        shim.write_text(_SHIM.format(python=sys.executable, entry=entry))
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "ASTRA_STATE_DIR": str(tmp_path / "state"),
    }
    daemons = re.findall(r"^astrad --name (\S+)", code, re.M)
    stops = "".join(f"astra stop --name {n} >/dev/null 2>&1 || true; " for n in daemons)
    script = f"set -e\ntrap 'rc=$?; {stops}exit $rc' EXIT\n{code}"  # no daemon outlives it
    out = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"README.md line {line}:\n{out.stdout}\n{out.stderr}"
    if "astra top" in code:
        assert "astra top - astrad" in out.stdout


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


def test_the_performance_table_is_the_saved_runs() -> None:
    """README's table is perf.summary's rendering of perf/results/2cpu-vm.jsonl, verbatim."""
    from perf.summary import _parse, render

    with open(os.path.join(ROOT, "perf", "results", "2cpu-vm.jsonl"), encoding="utf-8") as f:
        table = render(_parse(f))
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert table in f.read()
