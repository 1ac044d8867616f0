"""Tools: @astra.tool, Client.call_tool, capabilities granted at spawn, the audit log, and
tools crashing, timing out or exhausting memory while the agent and worker carry on
(astra/_tools.py, kernel/tools.py)."""

from __future__ import annotations

import json

import pytest

import astra
from astra._cli import EXIT_OK, main
from sandbox import SandboxCrashed, SandboxMemoryError, SandboxTimeout
from tests.astra.tools_defs import Reviewer

pytestmark = pytest.mark.multiprocess


def test_call_tool_runs_sandboxed_and_is_audited(kernel):
    assert kernel.call_tool("word_count", "a b c").result(timeout=30) == 3
    assert kernel.call_tool("python", "1 + 2").result(timeout=30) == 3
    with pytest.raises(astra.CapabilityError):
        kernel.call_tool("no_such_tool")
    entries = kernel.audit()
    assert [(e.agent, e.tool, e.outcome) for e in entries] == [
        ("", "word_count", "ok"),
        ("", "python", "ok"),
    ]
    assert entries[0].duration_s > 0
    assert entries[0].peak_rss_kb > 0
    assert len(entries[0].args_digest) == 32


@pytest.mark.slow
def test_a_tool_crashing_timing_out_or_out_of_memory_leaves_the_worker_running(kernel):
    with pytest.raises(SandboxTimeout):
        kernel.call_tool("hang").result(timeout=30)
    with pytest.raises(SandboxMemoryError):
        kernel.call_tool("hog").result(timeout=30)
    with pytest.raises(SandboxCrashed):
        kernel.call_tool("crash").result(timeout=30)
    assert kernel.call_tool("word_count", "still here").result(timeout=30) == 2
    assert all(kernel._control.worker(i).restarts == 0 for i in range(2))
    outcomes = [e.outcome for e in kernel.audit()]
    assert outcomes == ["SandboxTimeout", "SandboxMemoryError", "SandboxCrashed", "ok"]


@pytest.mark.slow
def test_an_agent_calls_only_the_tools_granted_at_spawn(kernel):
    reviewer = kernel.spawn(Reviewer, name="rev", tools=["word_count", "shell"])
    assert reviewer.ask("review", "one two three").result(timeout=30) == 3
    assert reviewer.ask("try_tool", "python", "1").result(timeout=30) == (
        "error",
        "CapabilityError",
    )
    assert reviewer.ask("try_tool", "hang").result(timeout=30) == ("error", "CapabilityError")
    assert reviewer.ask("try_tool", "shell", "exit 3").result(timeout=30) == ("ok", 3)
    assert reviewer.ask("count").result(timeout=10) == 1  # the agent carried on
    entries = [(e.agent, e.tool, e.outcome) for e in kernel.audit()]
    assert entries == [
        ("rev", "word_count", "ok"),
        ("rev", "python", "refused"),
        ("rev", "hang", "refused"),
        ("rev", "shell", "ok"),
    ]
    with pytest.raises(astra.CapabilityError):
        kernel.spawn(Reviewer, tools=["not_registered"])


@pytest.mark.slow
def test_a_granted_tool_failing_inside_an_agent_is_its_typed_outcome(kernel):
    reviewer = kernel.spawn(Reviewer, tools=["hog", "crash"])
    assert reviewer.ask("try_tool", "hog").result(timeout=30) == ("error", "SandboxMemoryError")
    assert reviewer.ask("try_tool", "crash").result(timeout=30) == ("error", "SandboxCrashed")
    assert reviewer.ask("count").result(timeout=10) == 0


@pytest.mark.slow
def test_astra_audit_prints_the_daemons_tool_calls(astrad, capsys):
    where = ["--name", astrad.name, "--state-dir", astrad.state_dir]
    with astrad.connect() as client:
        client.call_tool("word_count", "x y").result(timeout=30)
    assert main(["audit", *where, "--json"]) == EXIT_OK
    entries = json.loads(capsys.readouterr().out)
    assert [(e["tool"], e["outcome"]) for e in entries] == [("word_count", "ok")]
    assert main(["audit", *where]) == EXIT_OK
    assert "word_count" in capsys.readouterr().out


def test_tool_registration_checks_its_policy():
    with pytest.raises(ValueError, match="cpu_s"):

        @astra.tool(cpu_s=-1)
        def bad():
            return None

    with pytest.raises(ValueError, match="name"):
        astra.tool(name="python")(lambda: None)
