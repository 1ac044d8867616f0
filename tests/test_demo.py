"""``astra demo`` (astra/_demo.py) end to end on a small tree whose counts are known, with the
offline LLM, a fake OpenAI-compatible endpoint, and the live view; and examples/."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
from typing import ClassVar

import pytest

from astra import _demo
from astra._demo import EXIT_OK, EXIT_USAGE, OfflineLLM, Planner, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- A small tree with known counts ----

MATHY = '''\
"""Small maths.

>>> double(2)
4
"""


def double(x):
    """Twice x.

    >>> double(3)
    6
    >>> double(4)
    9
    """
    return 2 * x


def grade(score, bonus=0):
    # deliberately branchy: complexity 11
    if score > 90 and bonus:
        return "A+"
    if score > 90:
        return "A"
    if score > 80:
        return "B"
    if score > 70:
        return "C"
    if score > 60:
        return "D"
    for _ in range(bonus):
        score += 1
    while score < 0:
        score += 10
    try:
        return "E" if score > 50 else "F"
    except:
        return "?"
'''

BROKEN = "def broken(:\n    pass\n"


def _util() -> str:
    body = "\n".join(f"    total += {i}" for i in range(90))
    return (
        textwrap.dedent('''\
        class Store:
            """A store."""

            def get(self, key):
                def inner():
                    return key

                return inner()

            def put(self, key, value):
                pass


        def long_one():
            total = 0
        ''')
        + body
        + "\n    return total\n"
    )


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "mathy.py").write_text(MATHY)
    (root / "broken.py").write_text(BROKEN)
    (root / "pkg" / "util.py").write_text(_util())
    (root / "notes.txt").write_text("not python\n")
    for skipped in (".hidden", "__pycache__"):  # never reviewed
        (root / skipped).mkdir()
        (root / skipped / "skip.py").write_text("def nope(:\n")
    return root


def _lines(text):
    lines = text.splitlines()
    blank = sum(not ln.strip() for ln in lines)
    comments = sum(ln.lstrip().startswith("#") for ln in lines)
    return len(lines), blank, comments


EXPECTED_FINDINGS = {
    "bare-except": 1,  # grade's except:
    "complex-function": 1,  # grade
    "doctest-failure": 1,  # double(4)
    "long-function": 1,  # long_one
    "syntax-error": 1,  # broken.py
}


def _run_json(capsys, *argv):
    assert main([*argv, "--json"]) == EXIT_OK
    out = capsys.readouterr()
    return json.loads(out.out), out.err


# ---- End to end ----


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_demo_counts_match_its_input(tree, capsys):
    s, _ = _run_json(capsys, str(tree), "--workers", "2")
    texts = [MATHY, BROKEN, _util()]
    lines = [_lines(t) for t in texts]
    assert s["files"] == 3
    assert s["lines"] == sum(n for n, _, _ in lines)
    assert s["blank"] == sum(b for _, b, _ in lines)
    assert s["comments"] == sum(c for _, _, c in lines) == 1
    assert s["functions"] == 6  # double, grade, Store.get, Store.get.inner, Store.put, long_one
    assert s["classes"] == 1
    assert (s["doctests"], s["doctests_run"], s["doctests_failed"]) == (3, 3, 1)
    assert s["syntax_errors"] == 1
    assert s["findings_by_kind"] == EXPECTED_FINDINGS
    assert s["findings"] == sum(EXPECTED_FINDINGS.values())
    assert s["most_complex"][0] == {"path": "mathy.py", "function": "grade", "complexity": 11}
    # compile every file; doctests and checks where it parses; doctests only where it has some
    assert s["tool_calls"] == s["review_tool_calls"] == 3 + 1 + 2
    assert s["tool_outcomes"] == {"ok": 6}
    assert s["tasks"] == 4 * 3 + 1
    assert sum(s["tasks_by_worker"].values()) == 13
    assert s["agents"] == 2 + 2 * 2  # tracker, planner, two reviewers per worker
    assert s["llm_calls"] == 3  # each file has a finding
    assert s["events_by_topic"] == {
        "review.file.done": 3,
        "review.plan": 1,
        **{f"review.finding.{k}": n for k, n in EXPECTED_FINDINGS.items()},
    }
    assert s["events"] == 1 + 3 + 5
    assert s["memory"]["reviews"] == 3
    assert s["memory"]["findings"] == 5
    assert s["memory"]["like"] == "mathy.py"
    assert {p for p, _ in s["memory"]["similar"]} == {"broken.py", "pkg/util.py"}
    assert s["review_comments"]["broken.py"] == (
        "Fix the syntax error at line 1 first: nothing else can run."
    )
    assert "split grade (complexity 11)" in s["review_comments"]["mathy.py"]
    assert s["llm"] == "offline"
    assert set(s["phases_s"]) == {"kernel", "plan", "analysis", "review", "memory"}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_demo_prints_a_summary_for_people(tree, capsys):
    assert main([str(tree / "mathy.py"), "--workers", "1"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "the planner agent: 1 files, a graph of 5 tasks" in out
    assert "findings 3: bare-except 1, complex-function 1, doctest-failure 1" in out
    assert "doctests 3 found, 3 run, 1 failed" in out
    assert "the kernel stopped and removed its shared memory" in out


class _FakeModel(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint that answers every prompt alike."""

    requests: ClassVar[list[dict]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, **body})
        reply = {"choices": [{"message": {"role": "assistant", "content": " LGTM, mostly. "}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_model():
    _FakeModel.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeModel)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_llm_step_calls_an_openai_compatible_endpoint(tree, capsys, fake_model):
    s, _ = _run_json(capsys, str(tree), "--workers", "2", "--llm-url", fake_model)
    assert s["llm"] == fake_model
    assert s["llm_calls"] == 3
    assert s["review_comments"] == dict.fromkeys(
        ["broken.py", "mathy.py", "pkg/util.py"], "LGTM, mostly."
    )
    assert len(_FakeModel.requests) == 3
    for request in _FakeModel.requests:
        assert request["path"] == "/v1/chat/completions"
        assert [m["role"] for m in request["messages"]] == ["system", "user"]
        assert request["messages"][1]["content"].startswith("Review ")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_down_endpoint_leaves_a_note_not_a_crash(tree, capsys):
    s, _ = _run_json(capsys, str(tree / "broken.py"), "--llm-url", "http://127.0.0.1:9/v1")
    assert s["llm_calls"] == 1
    assert s["review_comments"]["broken.py"].startswith("(no comment: the LLM call failed")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_top_draws_the_live_view_while_it_runs(tree, capsys, monkeypatch):
    monkeypatch.setattr(_demo, "TOP_REFRESH_S", 0.05)
    s, err = _run_json(capsys, str(tree), "--workers", "2", "--top")
    assert s["files"] == 3
    frames = err.count("astra top - astrad 'demo'")
    assert frames >= 2  # the first, and the last after the work
    last = err[err.rindex("astra top - astrad 'demo'") :]
    assert "w00" in last
    assert "w01" in last
    assert "reviewer-0" in last
    assert "tools: 6 sandboxed calls (ok 6)" in last
    assert "review: 3 files done" in last
    assert "no frame" not in err


def test_a_missing_path_is_a_usage_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == EXIT_USAGE
    assert "no such file or directory" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_tree_without_python_files_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x")
    assert main([str(tmp_path), "--workers", "1"]) == EXIT_USAGE
    assert "no Python files" in capsys.readouterr().err


def test_the_default_tree_is_astras_own_source():
    roots = _demo.default_roots()
    assert [os.path.basename(r) for r in roots] == ["astra", "kernel", "ipc", "sandbox"]
    assert os.path.join(roots[0], "_demo.py") in _demo.find_python_files(roots)


# ---- Pieces ----


def test_the_offline_llm_is_deterministic():
    findings = [
        _demo.Finding("a.py", "complex-function", 3, "f has complexity 14"),
        _demo.Finding("a.py", "bare-except", 9, "a bare 'except:' also catches exits"),
    ]
    prompt = _demo.review_prompt("a.py", findings)
    comment = asyncio.run(OfflineLLM().complete(prompt))
    assert comment == (
        "Split f (complexity 14) into smaller functions; catch a named exception at line 9, "
        "not everything."
    )
    assert asyncio.run(OfflineLLM().complete("Review b.py.")) == "Looks good."


def test_complexity_counts_branches_not_nested_functions():
    import ast

    tree = ast.parse(MATHY + "\n\ndef outer(a, b):\n    def inner():\n        if a: pass\n"
                     "    return [x for x in a if x and b]\n")  # fmt: skip
    got = {f.name: f.complexity for f in _demo.functions_of(tree)}
    assert got == {"double": 1, "grade": 11, "outer": 4, "outer.inner": 2}


def test_the_planner_balances_batches_by_lines():
    sizes = [("a", 100), ("b", 60), ("c", 50), ("d", 10)]
    assert Planner().assign(sizes, 2) == [["a", "d"], ["b", "c"]]  # 110 lines each
    assert Planner().assign(sizes, 5)[4] == []


# ---- examples/ ----


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_review_team_example_runs(tree):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "review_team.py"), str(tree)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    ).stdout
    assert "3 files" in out
    assert "broken.py: syntax error at line 1" in out
