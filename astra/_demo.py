"""``astra demo``: a code-review team of agents over a real source tree, on an embedded kernel.

Deterministic, offline, done in seconds, and every part of Astra at work on a real job. By
default it reviews Astra's own source (the ``astra``, ``kernel``, ``ipc`` and ``sandbox``
packages, found from the installed package); ``astra demo PATH`` reviews another tree.

    client (this process)                 workers (one per core)
    1. spawn Tracker, Planner, Reviewers  agents: a mailbox each, on every worker
    2. Planner.plan(roots) ------------>  walks the tree, builds an astra.Graph
    3. k.run(graph) ------------------->  per file: read -> {parse, count} -> report; then
                                          one rollup over all: tasks on every core
    4. Reviewer.review(batch) x N ----->  per file, in sandboxed tools: compile (the built-in
                                          ``python`` tool), doctests, checks; the LLM step
                                          writes a comment; the review goes to memory
                                          ("team") and progress to ``review.#`` (Tracker)
    5. summary <---- the replies, the Tracker's counts, memory (vector recall), the audit log

The LLM step is behind ``LLM`` (``async def complete(prompt) -> str``): ``OfflineLLM``, the
default, writes a rule-based comment from the findings in the prompt; ``--llm-url`` plugs in
an OpenAI-compatible chat-completions endpoint (``HTTPLLM``, standard library only), awaited
in the reviewers' async handlers so that the LLM calls of a worker overlap.

``--top`` draws the ``astra top`` frame (astra/_top.py) of the embedded kernel while it
runs. ``--json`` prints the summary for scripts (and tests/test_demo.py).

Size: about 1,000 lines, past the 800 mark, because it is one program that reads top to
bottom and one file was its brief. The seams for a split (an ``astra/demo/`` package) are
the banners: analysis, tools, LLM, memory, agents, run, live view, command line.
"""

from __future__ import annotations

__all__ = [
    "HTTPLLM",
    "LLM",
    "FileReport",
    "FileReview",
    "Finding",
    "FunctionInfo",
    "OfflineLLM",
    "Planner",
    "Reviewer",
    "Tracker",
    "main",
    "run_demo",
]

import argparse
import ast
import asyncio
import collections
import contextlib
import dataclasses
import doctest  # imported here, so a tool's child (forked from a worker) already has it
import inspect
import io
import json
import math
import os
import pathlib
import re
import sys
import threading
import time
import urllib.request
from typing import TYPE_CHECKING, Any, Final, Protocol, TextIO, cast

import psutil  # type: ignore[import-untyped]

from kernel.actors import Agent

from ._errors import AstraError
from ._graph import Graph
from ._kernel import Kernel
from ._tools import tool
from ._top import render_frame

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from ._agents import AgentRef

#: Exit codes: done, or a path with nothing to review (sysexits.h EX_USAGE).
EXIT_OK: Final = 0
EXIT_USAGE: Final = 64
#: A function with more branch points than this is a ``complex-function`` finding.
MAX_COMPLEXITY: Final = int(os.getenv("ASTRA_DEMO_MAX_COMPLEXITY", "10"))
#: A function longer than this many lines is a ``long-function`` finding.
MAX_FUNCTION_LINES: Final = int(os.getenv("ASTRA_DEMO_MAX_FUNCTION_LINES", "80"))
#: Reviewers per worker, and files one reviewer checks at once (their LLM calls overlap).
REVIEWERS_PER_WORKER: Final = 2
REVIEW_CONCURRENCY: Final = 4
#: Seconds between frames of the live view (``--top``).
TOP_REFRESH_S: Final = float(os.getenv("ASTRA_DEMO_TOP_REFRESH_S", "0.5"))
#: Directories never reviewed (hidden ones neither).
SKIP_DIRS: Final = frozenset({
    "__pycache__", "node_modules", "build", "dist", "venv", "site-packages",
})  # fmt: skip
#: The memory namespace the reviewers share.
TEAM: Final = "team"


# ---- What the team produces ----


@dataclasses.dataclass(frozen=True, slots=True)
class FunctionInfo:
    """A function or method, as the analysis measured it."""

    name: str  #: qualified within its file: ``Class.method``, ``outer.inner``
    line: int
    length: int  #: lines from ``def`` to the end of its body
    complexity: int  #: McCabe's: 1 + branch points, nested functions not included


@dataclasses.dataclass(frozen=True, slots=True)
class FileReport:
    """What the analysis graph measured of one file."""

    path: str
    lines: int
    code: int
    comments: int
    blank: int
    classes: int
    doctests: int  #: examples (``>>>``) in its docstrings
    functions: tuple[FunctionInfo, ...]
    syntax_error: tuple[int, str] | None  #: (line, message) if it does not parse


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    """One thing a reviewer flagged."""

    path: str
    kind: str  #: syntax-error, doctest-failure, complex-function, long-function,
    #: bare-except, or tool-failure (the sandbox stopped a check)
    line: int
    detail: str


@dataclasses.dataclass(frozen=True, slots=True)
class FileReview:
    """A reviewer's verdict on one file."""

    path: str
    findings: tuple[Finding, ...]
    comment: str  #: the LLM step's review comment ("" when there was nothing to say)
    doctests_run: int
    doctests_failed: int
    tool_calls: int
    llm_calls: int


# ---- Analysis: the graph's tasks (module level, so that workers import them by name) ----


def read_source(path: str) -> str:
    """Task: the file's text (undecodable bytes replaced)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def parse_source(path: str, text: str) -> tuple[int, int, tuple[FunctionInfo, ...], object]:
    """Task: (classes, doctest examples, functions, (line, message) or None) of a file."""
    try:
        tree = ast.parse(text, filename=path)
    except (SyntaxError, ValueError) as exc:
        return 0, 0, (), (getattr(exc, "lineno", 0) or 0, getattr(exc, "msg", str(exc)))
    classes = sum(isinstance(n, ast.ClassDef) for n in ast.walk(tree))
    examples = sum(doctest_examples(doc) for _, _, doc in docstrings(tree))
    return classes, examples, tuple(functions_of(tree)), None


def count_lines(text: str) -> tuple[int, int, int, int]:
    """Task: (lines, code, comment, blank) lines of a file."""
    lines = text.splitlines()
    blank = sum(not ln.strip() for ln in lines)
    comments = sum(ln.lstrip().startswith("#") for ln in lines)
    return len(lines), len(lines) - blank - comments, comments, blank


def file_report(
    path: str, parsed: tuple[int, int, tuple[FunctionInfo, ...], object], counted: tuple[int, ...]
) -> FileReport:
    """Task: a file's parse and line counts, joined."""
    classes, examples, functions, error = parsed
    lines, code, comments, blank = counted
    syntax = cast("tuple[int, str]", tuple(error)) if isinstance(error, tuple | list) else None
    return FileReport(path, lines, code, comments, blank, classes, examples, functions, syntax)


def rollup(*reports: FileReport) -> dict[str, int]:
    """Task: totals over every file (the graph's last node)."""
    return {
        "files": len(reports),
        "lines": sum(r.lines for r in reports),
        "code": sum(r.code for r in reports),
        "comments": sum(r.comments for r in reports),
        "blank": sum(r.blank for r in reports),
        "functions": sum(len(r.functions) for r in reports),
        "classes": sum(r.classes for r in reports),
        "doctests": sum(r.doctests for r in reports),
        "syntax_errors": sum(r.syntax_error is not None for r in reports),
    }


_BRANCHES: Final = (
    ast.If, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler, ast.IfExp, ast.Assert,
    ast.comprehension, ast.match_case,
)  # fmt: skip
_SCOPES: Final = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def complexity(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """McCabe's number: 1 + branch points, not counting nested functions and classes."""
    n, stack = 1, list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        if isinstance(node, _SCOPES):
            continue
        if isinstance(node, _BRANCHES):
            n += 1 + (len(node.ifs) if isinstance(node, ast.comprehension) else 0)
        elif isinstance(node, ast.BoolOp):
            n += len(node.values) - 1
        stack.extend(ast.iter_child_nodes(node))
    return n


def functions_of(tree: ast.AST, prefix: str = "") -> Iterable[FunctionInfo]:
    """Every function of ``tree``, nested ones included, in source order."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            yield FunctionInfo(prefix + node.name, node.lineno, length, complexity(node))
            yield from functions_of(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions_of(node, f"{prefix}{node.name}.")
        else:
            yield from functions_of(node, prefix)


def docstrings(tree: ast.Module) -> list[tuple[str, int, str]]:
    """(name, line, docstring) of the module, its classes and its functions."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((getattr(node, "name", "<module>"), node.body[0].lineno, doc))
    return out


def doctest_examples(doc: str) -> int:
    """How many examples a docstring holds (0 for a malformed one)."""
    try:
        return len(doctest.DocTestParser().get_examples(doc))
    except ValueError:
        return 0


# ---- Checks: tools, run in a seccomp-filtered child of the reviewer's worker ----

#: Source for the built-in ``python`` tool: compile a file, run none of it.
COMPILE_SNIPPET: Final = """\
try:
    compile({source!r}, {filename!r}, "exec", dont_inherit=True)
    _result = None
except (SyntaxError, ValueError) as _exc:
    _result = (getattr(_exc, "lineno", 0) or 0, getattr(_exc, "msg", str(_exc)))
_result
"""


class _Recorder(doctest.DocTestRunner):
    """A doctest runner that keeps (line, summary) of each failing example."""

    def __init__(self) -> None:
        super().__init__(verbose=False, optionflags=doctest.ELLIPSIS)
        self.failed_examples: list[tuple[int, str]] = []

    def report_failure(self, out: Any, test: Any, example: Any, got: str) -> None:
        self._note(test, example, f"expected {example.want.strip()!r}, got {got.strip()!r}")

    def report_unexpected_exception(self, out: Any, test: Any, example: Any, exc: Any) -> None:
        self._note(test, example, f"raised {exc[0].__name__}: {exc[1]}")

    def _note(self, test: doctest.DocTest, example: doctest.Example, what: str) -> None:
        line = (test.lineno or 0) + example.lineno  # the docstring's line + the offset in it
        text = f"{test.name}: {example.source.strip()[:60]!r} {what}"
        self.failed_examples.append((line, text[:200]))


def run_doctests(source: str, filename: str) -> tuple[int, int, list[tuple[int, str]]]:
    """Tool ``review_doctests``: run a file's doctests against its own top level; (run,
    failed, [(line, what)]). This executes the file's code: hence the sandbox."""
    globs: dict[str, object] = {"__name__": "__review__", "__file__": filename}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        exec(compile(source, filename, "exec"), globs)  # a failed import: tests may still run
    runner = _Recorder()
    for name, line, doc in docstrings(ast.parse(source)):
        try:
            test = doctest.DocTestParser().get_doctest(doc, dict(globs), name, filename, line)
        except ValueError as exc:
            runner.failed_examples.append((line, f"{name}: malformed doctest: {exc}"[:200]))
            continue
        runner.run(test, out=lambda _text: None, clear_globs=False)
    return runner.tries, len(runner.failed_examples), runner.failed_examples


def check_code(source: str, max_complexity: int, max_lines: int) -> list[tuple[str, int, str]]:
    """Tool ``review_checks``: (kind, line, detail) of each complex or long function and
    each bare ``except:``. Parsing an untrusted file is a job for a sandbox too."""
    tree = ast.parse(source)
    out = [("bare-except", node.lineno, "a bare 'except:' also catches exits")
           for node in ast.walk(tree)
           if isinstance(node, ast.ExceptHandler) and node.type is None]  # fmt: skip
    for fn in functions_of(tree):
        if fn.complexity > max_complexity:
            out.append(("complex-function", fn.line, f"{fn.name} has complexity {fn.complexity}"))
        if fn.length > max_lines:
            out.append(("long-function", fn.line, f"{fn.name} is {fn.length} lines long"))
    return sorted(out, key=lambda f: (f[1], f[0]))


tool(run_doctests, name="review_doctests", profile="python", cpu_s=5, memory_mb=256, timeout_s=10)
tool(check_code, name="review_checks", profile="python", cpu_s=5, memory_mb=256, timeout_s=10)
#: The tools a reviewer is granted at spawn (it can call nothing else).
REVIEW_TOOLS: Final = ("python", "review_doctests", "review_checks")


# ---- The LLM step ----


class LLM(Protocol):
    """What a reviewer needs of a language model: a prompt in, a completion out, awaited
    (so that the calls of one worker overlap)."""

    async def complete(self, prompt: str) -> str: ...


#: A line of advice per finding kind, for the offline LLM.
_ADVICE: Final = {
    "syntax-error": "fix the syntax error at line {line} first: nothing else can run",
    "doctest-failure": "the example at line {line} no longer matches the code",
    "complex-function": "split {name} (complexity {n}) into smaller functions",
    "long-function": "{name} is {n} lines: extract its steps into helpers",
    "bare-except": "catch a named exception at line {line}, not everything",
}
_FINDING_LINE: Final = re.compile(r"^- (?P<kind>[\w-]+) at line (?P<line>\d+): (?P<detail>.*)$")


class OfflineLLM:
    """A deterministic stand-in for a model: a rule-based review comment from the findings
    listed in the prompt (``review_prompt``). No network, no weights."""

    async def complete(self, prompt: str) -> str:
        advice = []
        for match in filter(None, map(_FINDING_LINE.match, prompt.splitlines())):
            words = match["detail"].split()
            numbers = [w for w in words if w.isdigit()]
            advice.append(_ADVICE.get(match["kind"], "look at line {line}").format(
                line=match["line"], name=words[0] if words else "?",
                n=numbers[-1] if numbers else "?",
            ))  # fmt: skip
        if not advice:
            return "Looks good."
        text = "; ".join(advice[:3]) + (f" (and {len(advice) - 3} more)" if advice[3:] else "")
        return text[:1].upper() + text[1:] + "."


class HTTPLLM:
    """An OpenAI-compatible endpoint (``POST <url>/chat/completions``), called with
    ``urllib`` on a thread so that the agent's event loop goes on. The API key, if any, is
    ``OPENAI_API_KEY``; the model ``ASTRA_DEMO_MODEL`` (default ``"default"``)."""

    def __init__(self, url: str, model: str | None = None, timeout_s: float = 60.0) -> None:
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model or os.getenv("ASTRA_DEMO_MODEL", "default")
        self.timeout_s = timeout_s

    async def complete(self, prompt: str) -> str:
        return await asyncio.to_thread(self._post, prompt)

    def _post(self, prompt: str) -> str:
        messages = [
            {"role": "system", "content": "You are a terse, kind code reviewer."},
            {"role": "user", "content": prompt},
        ]
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0})
        headers = {"Content-Type": "application/json"}
        if key := os.getenv("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, body.encode(), headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            data = json.load(response)
        return str(data["choices"][0]["message"]["content"]).strip()


def make_llm(url: str | None) -> LLM:
    """``HTTPLLM(url)``, or ``OfflineLLM()`` without a URL."""
    return HTTPLLM(url) if url else OfflineLLM()


def review_prompt(path: str, findings: Sequence[Finding]) -> str:
    lines = [f"Review {path}. A static check found:"]
    lines += [f"- {f.kind} at line {f.line}: {f.detail}" for f in findings]
    lines.append("Write one short review comment for its author.")
    return "\n".join(lines)


# ---- Memory: the team's shared namespace ----


class _Memory(Protocol):
    """The part of the memory service's namespace API the demo uses."""

    def append(self, log: str, item: object) -> int: ...
    def range(self, log: str, since: Any = None, until: Any = None) -> list[tuple[int, Any]]: ...
    def add(self, id: str, vector: Any, meta: object = None) -> None: ...
    def search(self, vector: Any, k: int = 10) -> Sequence[Any]: ...


_stores: dict[str, Any] = {}  # this process's fallback stores, by path (one LMDB handle each)
_stores_lock = threading.Lock()  # reviewers open theirs on executor threads, at once


def memory_service(k: Kernel) -> bool:
    """Whether the memory service (astra/memory.py) runs here: clients have
    ``k.memory(name)``, agents ``self.shared_memory(name)``, and ``spawn`` takes grants."""
    return (
        callable(getattr(k, "memory", None))
        and callable(getattr(Agent, "shared_memory", None))
        and "memory" in inspect.signature(k.spawn).parameters
    )


def team_memory(owner: object, store_dir: str | None) -> _Memory:
    """The shared ``team`` namespace: through the memory service when ``store_dir`` is
    None (``self.shared_memory("team")`` in an agent, ``k.memory("team")`` in a client),
    else the service's storage engine, ``kernel.memory``, opened on ``store_dir``."""
    if store_dir is None:
        service = getattr(owner, "shared_memory", None) or getattr(owner, "memory", None)
        return cast("_Memory", cast("Any", service)(TEAM))
    from kernel.memory import MemoryStore

    with _stores_lock:
        store = _stores.get(store_dir)
        if store is None or store.closed:
            store = _stores[store_dir] = MemoryStore(store_dir, sync=False)
        return cast("_Memory", store.namespace(TEAM))


def close_memory() -> None:
    """Close this process's fallback stores (none where the memory service runs)."""
    with _stores_lock:
        while _stores:
            _stores.popitem()[1].close()


def hit_fields(hit: Any) -> tuple[str, float]:
    """(id, score) of a search hit: the service's hit object or the engine's tuple."""
    if hasattr(hit, "id"):
        return str(hit.id), float(hit.score)
    return str(hit[0]), float(hit[1])


def profile_vector(report: FileReport, findings: int) -> list[float]:
    """A file's shape as a vector, for "the files most like this one"."""
    cx = [f.complexity for f in report.functions] or [0]
    return [
        1.0, math.log1p(report.lines), math.log1p(len(report.functions)), sum(cx) / len(cx),
        math.log1p(max(cx)), report.comments / max(1, report.lines), math.log1p(report.classes),
        math.log1p(report.doctests), math.log1p(findings),
    ]  # fmt: skip


# ---- The agents (module level, so that workers import them by name) ----


class Tracker(Agent):
    """Counts the team's progress events (``review.#``) for the live view and the summary."""

    subscriptions = ("review.#",)

    def __init__(self) -> None:
        self.by_topic: collections.Counter[str] = collections.Counter()

    def on_message(self, topic: str, msg: object) -> None:
        self.by_topic[topic] += 1

    def progress(self) -> dict[str, Any]:
        return {
            "events": self.by_topic.total(),
            "files_done": self.by_topic["review.file.done"],
            "by_topic": dict(sorted(self.by_topic.items())),
        }


class Planner(Agent):
    """Plans the work: the files, the analysis graph, and the reviewers' batches."""

    def plan(self, roots: list[str]) -> tuple[Graph, list[str]]:
        """The files under ``roots`` and a graph of four tasks per file (read, then parse
        and count, then report) plus one rollup over every report. Nodes are named
        ``read:<path>``, ``report:<path>`` and ``rollup``."""
        files = find_python_files(roots)
        g = Graph()
        reports = []
        for path in files:
            text = g.add(read_source, path, name=f"read:{path}")
            parsed = g.add(parse_source, path, text)
            counted = g.add(count_lines, text)
            reports.append(g.add(file_report, path, parsed, counted, name=f"report:{path}"))
        g.add(rollup, *reports, name="rollup")
        self.publish("review.plan", {"files": len(files), "tasks": len(g)})
        return g, files

    def assign(self, sizes: list[tuple[str, int]], teams: int) -> list[list[str]]:
        """``(path, lines)`` split among ``teams`` reviewers: largest first, each to the
        least loaded."""
        loads = [(0, i) for i in range(teams)]
        batches: list[list[str]] = [[] for _ in range(teams)]
        for path, lines in sorted(sizes, key=lambda s: (-s[1], s[0])):
            load, i = min(loads)
            loads[i] = (load + lines, i)
            batches[i].append(path)
        return [sorted(b) for b in batches]


class Reviewer(Agent):
    """Reviews files: checks in sandboxed tools, a comment from the LLM, the review into
    memory, progress on ``review.*``."""

    def __init__(self, llm_url: str | None, store_dir: str | None) -> None:
        self.llm_url = llm_url
        self.store_dir = store_dir

    async def review(self, batch: list[tuple[FileReport, str]]) -> list[FileReview]:
        """Review each (report, source) of ``batch``, ``REVIEW_CONCURRENCY`` at a time."""
        llm = make_llm(self.llm_url)
        gate = asyncio.Semaphore(REVIEW_CONCURRENCY)

        async def one(report: FileReport, source: str) -> FileReview:
            async with gate:
                return await self._review_file(llm, report, source)

        return list(await asyncio.gather(*(one(r, s) for r, s in batch)))

    async def _review_file(self, llm: LLM, report: FileReport, source: str) -> FileReview:
        findings, run, failed, calls = await self._checks(report.path, report.doctests, source)
        comment = ""
        if findings:
            try:
                comment = await llm.complete(review_prompt(report.path, findings))
            except (OSError, ValueError, LookupError, TypeError) as exc:  # the endpoint failed
                comment = f"(no comment: the LLM call failed: {exc})"
        review = FileReview(report.path, tuple(findings), comment, run, failed, calls,
                            int(bool(findings)))  # fmt: skip
        await asyncio.to_thread(self._remember, report, review)  # a commit: off the loop
        for f in findings:
            self.publish(f"review.finding.{f.kind}", {"path": f.path, "line": f.line})
        self.publish("review.file.done", {"path": report.path, "findings": len(findings)})
        return review

    async def _checks(
        self, path: str, doctests: int, source: str
    ) -> tuple[list[Finding], int, int, int]:
        """(findings, doctests run, doctests failed, tool calls) of one file."""
        error = await self._tool(
            path, "python", COMPILE_SNIPPET.format(source=source, filename=path)
        )
        if isinstance(error, list | tuple):  # (line, message): nothing else can run
            return [Finding(path, "syntax-error", int(error[0]), str(error[1]))], 0, 0, 1
        found = [error] if isinstance(error, Finding) else []
        run = failed = 0
        if doctests:
            out = await self._tool(path, "review_doctests", source, path)
            if isinstance(out, Finding):
                found.append(out)
            else:
                run, failed, failures = cast("tuple[int, int, list[tuple[int, str]]]", out)
                found += [Finding(path, "doctest-failure", ln, what) for ln, what in failures]
        out = await self._tool(path, "review_checks", source, MAX_COMPLEXITY, MAX_FUNCTION_LINES)
        if isinstance(out, Finding):
            found.append(out)
        else:
            found += [Finding(path, *f) for f in cast("list[tuple[str, int, str]]", out)]
        return sorted(found, key=lambda f: (f.line, f.kind)), run, failed, 2 + bool(doctests)

    async def _tool(self, path: str, name: str, *args: object) -> object:
        """A tool's value, or a ``tool-failure`` finding if the sandbox stopped the call
        (``SandboxTimeout``, ``SandboxMemoryError``, ...): the reviewer carries on."""
        try:
            return await self.tool(name, *args)
        except Exception as exc:
            return Finding(path, "tool-failure", 0, f"{name}: {type(exc).__name__}: {exc}"[:200])

    def _remember(self, report: FileReport, review: FileReview) -> None:
        team = team_memory(self, self.store_dir)
        findings = [[f.kind, f.line, f.detail] for f in review.findings]
        team.append("reviews", {"path": review.path, "comment": review.comment,
                                "findings": findings})  # fmt: skip
        team.add(report.path, profile_vector(report, len(findings)), {"path": report.path})


def find_python_files(roots: Iterable[str]) -> list[str]:
    """Every ``.py`` file under ``roots`` (files or directories), absolute and sorted,
    skipping ``SKIP_DIRS`` and hidden directories."""
    found: set[str] = set()
    for root in roots:
        if os.path.isfile(root):
            found.add(os.path.abspath(root))
        for here, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
            found.update(os.path.abspath(os.path.join(here, n)) for n in names if n.endswith(".py"))
    return sorted(found)


# ---- The run ----


class _Run:
    """One run: the kernel, the team, the phases' timings, and the progress lines (printed
    as they come, or drawn above the live view's frame on a terminal)."""

    def __init__(self, k: Kernel, llm_url: str | None, echo: TextIO | None) -> None:
        self.k = k
        self.echo = echo
        self.live: _LiveView | None = None
        self.notes: list[str] = []
        self.phases: dict[str, float] = {}
        self._before: list[Any] = []
        # The memory service's "team", or (until it runs here) its engine on a directory.
        service = memory_service(k)
        self.store_dir = None if service else os.path.join(k.data_dir or "", "demo-memory")
        self.tracker = k.spawn(Tracker, name="tracker", mailbox=1 << 14)
        self.planner = k.spawn(Planner, name="planner")
        grant: dict[str, Any] = {"memory": [TEAM]} if service else {}
        self.reviewers = [
            k.spawn(Reviewer, llm_url, self.store_dir, name=f"reviewer-{i}",
                    tools=REVIEW_TOOLS, **grant)
            for i in range(REVIEWERS_PER_WORKER * k.workers)
        ]  # fmt: skip

    def say(self, phase: str, since: float, text: str) -> None:
        self.phases[phase] = time.perf_counter() - since
        line = f"  {phase:<10}{self.phases[phase]:6.2f} s  {text}"
        self.notes.append(line)
        if self.echo is not None and not (self.live is not None and self.live.tty):
            print(line, file=self.echo, flush=True)

    def plan(self, roots: list[str]) -> tuple[Graph, list[str]]:
        t = time.perf_counter()
        graph, files = cast("tuple[Graph, list[str]]", self.planner.ask("plan", roots).result(60))
        self.say("plan", t, f"the planner agent: {len(files)} files, a graph of {len(graph)} tasks")
        return graph, files

    def analyse(
        self, graph: Graph, files: list[str]
    ) -> tuple[dict[str, Any], list[FileReport], dict[str, str]]:
        """Run the graph: (counts, the reports, the sources) of the files it could read."""
        t = time.perf_counter()
        self._before = self._workers()
        results = self.k.run(graph, return_exceptions=True)
        reports = [r for p in files if isinstance(r := results[graph[f"report:{p}"]], FileReport)]
        texts = {r.path: cast("str", results[graph[f"read:{r.path}"]]) for r in reports}
        self.say("analysis", t, f"{len(graph)} tasks on {self.k.workers} workers")
        totals = results[graph["rollup"]]
        counts = {
            **(totals if isinstance(totals, dict) else {}), "unreadable": len(files) - len(reports),
            "tasks": len(graph),
        }  # fmt: skip
        return counts, reports, texts

    def _workers(self) -> list[Any]:
        return [self.k._control.worker(i) for i in range(self.k.workers)]

    def spread(self) -> dict[str, Any]:
        """The tasks each worker ran since ``analyse`` began, and how many it stole (read
        later than the graph's end: a worker counts a task just after its reply)."""
        pairs = list(zip(self._workers(), self._before, strict=True))
        return {
            "tasks_by_worker": {f"w{a.index:02d}": a.tasks_done - b.tasks_done for a, b in pairs},
            "steals": sum(a.steals - b.steals for a, b in pairs),
        }

    def review(self, reports: list[FileReport], texts: dict[str, str]) -> list[FileReview]:
        t = time.perf_counter()
        sizes = [(r.path, r.lines) for r in reports]
        batches = cast("list[list[str]]", self.planner.ask("assign", sizes, len(self.reviewers))
                       .result(60))  # fmt: skip
        by_path = {r.path: r for r in reports}
        asks = [rev.ask("review", [(by_path[p], texts[p]) for p in batch])
                for rev, batch in zip(self.reviewers, batches, strict=True) if batch]  # fmt: skip
        reviews = [r for a in asks for r in cast("list[FileReview]", a.result(600))]
        self.say("review", t, f"{len(self.reviewers)} reviewers: "
                 f"{sum(r.tool_calls for r in reviews)} sandboxed tool calls, "
                 f"{sum(r.llm_calls for r in reviews)} LLM calls")  # fmt: skip
        return sorted(reviews, key=lambda r: r.path)

    def progress(self, files: int) -> dict[str, Any]:
        """The tracker's counts once it has seen every file's ``review.file.done``.

        Events travel worker to worker and replies to this client, on different rings, so
        a review's reply can overtake its last events: ask again, a bounded number of
        times, until the tracker has caught up."""
        deadline = time.monotonic() + 10.0
        while True:
            progress = cast("dict[str, Any]", self.tracker.ask("progress").result(30))
            if progress["files_done"] >= files or time.monotonic() > deadline:
                return progress
            time.sleep(0.01)

    def recall(self, reports: list[FileReport]) -> dict[str, Any]:
        """What the team left in memory: its reviews, and the files most like the one
        with the most complex function (vector recall)."""
        t = time.perf_counter()
        team = team_memory(self.k, self.store_dir)
        stored = [item for _, item in team.range("reviews")]
        findings = {item["path"]: len(item["findings"]) for item in stored}
        out: dict[str, Any] = {"reviews": len(stored), "findings": sum(findings.values())}
        worst = max(reports, key=lambda r: (max((f.complexity for f in r.functions), default=0),
                                            r.path))  # fmt: skip
        hits = team.search(profile_vector(worst, findings.get(worst.path, 0)), k=4)
        similar = [(i, s) for i, s in map(hit_fields, hits) if i != worst.path][:3]
        out |= {"like": worst.path, "similar": [[i, round(s, 3)] for i, s in similar]}
        names = ", ".join(os.path.basename(i) for i, _ in similar) or "-"
        self.say("memory", t, f"{len(stored)} reviews in {TEAM!r}; the files most like "
                 f"{os.path.basename(worst.path)}: {names}")  # fmt: skip
        return out


def run_demo(
    roots: Sequence[str],
    *,
    workers: int | None = None,
    llm_url: str | None = None,
    top: bool = False,
    echo: TextIO | None = None,
) -> dict[str, Any] | None:
    """Run the review team over ``roots`` on a fresh embedded kernel and return the
    summary (paths relative to the roots' common directory), or None if ``roots`` hold no
    Python file. Progress lines go to ``echo``; with ``top``, live frames to ``echo`` or
    stderr. Blocks until done; the kernel is stopped and its shared memory removed."""
    base, t0 = _common_dir(roots), time.perf_counter()
    with Kernel(workers=workers) as k:
        try:
            run = _Run(k, llm_url, echo)
            run.say("kernel", t0, f"astra-sup and {k.workers} workers, {2 + len(run.reviewers)} "
                    f"agents: a tracker, a planner, {len(run.reviewers)} reviewers")  # fmt: skip
            if top:
                run.live = _LiveView(k, run.tracker, echo or sys.stderr, run.notes)
                run.live.start()
            try:
                graph, files = run.plan([os.path.abspath(r) for r in roots])
                if not files:
                    return None
                summary, reports, texts = run.analyse(graph, files)
                reviews = run.review(reports, texts)
                progress = run.progress(len(reviews))
            finally:
                if run.live is not None:
                    run.live.stop()
                    run.live = None
            summary |= _review_counts(reports, reviews, progress) | run.spread()
            summary["memory"] = run.recall(reports) if reports else {}
            audit = collections.Counter(e.outcome for e in k.audit())
            summary |= {"tool_calls": audit.total(), "tool_outcomes": dict(sorted(audit.items())),
                        "agents": len(k.agents())}  # fmt: skip
        finally:
            close_memory()
    summary |= {
        "phases_s": {name: round(s, 3) for name, s in run.phases.items()},
        "elapsed_s": round(time.perf_counter() - t0, 3), "root": base,
        "llm": llm_url or "offline", "workers": k.workers,
    }  # fmt: skip
    return cast("dict[str, Any]", _relative(summary, base))


def _review_counts(
    reports: list[FileReport], reviews: list[FileReview], progress: dict[str, Any]
) -> dict[str, Any]:
    findings = [f for r in reviews for f in r.findings]
    ranked = sorted(((fn.complexity, r.path, fn.name) for r in reports for fn in r.functions),
                    key=lambda c: (-c[0], c[1], c[2]))  # fmt: skip
    return {
        "doctests_run": sum(r.doctests_run for r in reviews),
        "doctests_failed": sum(r.doctests_failed for r in reviews),
        "findings": len(findings),
        "findings_by_kind": dict(sorted(collections.Counter(f.kind for f in findings).items())),
        "llm_calls": sum(r.llm_calls for r in reviews),
        "review_tool_calls": sum(r.tool_calls for r in reviews),
        "events": progress["events"],
        "events_by_topic": progress["by_topic"],
        "most_complex": [{"path": p, "function": n, "complexity": c} for c, p, n in ranked[:5]],
        "review_comments": {r.path: r.comment for r in reviews if r.comment},
    }


def _common_dir(roots: Sequence[str]) -> str:
    base = os.path.commonpath([os.path.abspath(r) for r in roots])
    return os.path.dirname(base) if os.path.isfile(base) else base


def _relative(value: object, base: str) -> object:
    """``value`` with the absolute paths under ``base`` made relative to it."""
    if isinstance(value, str) and value.startswith(base + os.sep):
        return value[len(base) + 1 :]
    if isinstance(value, dict):
        return {_relative(k, base): _relative(v, base) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_relative(v, base) for v in value]
    return value


# ---- The live view (--top) ----


class _LiveView:
    """Draws ``astra top``'s frame (astra/_top.py ``render_frame``) for this embedded
    kernel, under the run's progress lines, every ``TOP_REFRESH_S`` on a thread of its
    own: in place on a terminal, one frame after another otherwise. ``stop`` draws the
    last frame and joins the thread."""

    def __init__(self, k: Kernel, tracker: AgentRef, stream: TextIO, notes: list[str]) -> None:
        self._k = k
        self._tracker = tracker
        self._stream = stream
        self._notes = notes
        self.tty = stream.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="astra-demo-top", daemon=True)
        self._procs: dict[int, psutil.Process] = {}
        self._prev: tuple[dict[str, Any], float] | None = None
        self._t0 = time.monotonic()
        self.frames = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0 if self.frames == 0 else TOP_REFRESH_S):
            self._draw()
        self._draw()  # the last frame, after the work

    def _draw(self) -> None:
        try:
            lines = self._frame()
        except (AstraError, TimeoutError, OSError) as exc:  # the kernel is stopping
            lines = [f"astra demo --top: no frame ({type(exc).__name__}: {exc})"]
        head = ["\x1b[H\x1b[2J", *self._notes, ""] if self.tty else []
        self._stream.write("\n".join([*head, *lines]) + "\n\n")
        self._stream.flush()
        self.frames += 1

    def _frame(self) -> list[str]:
        snap, now = self._snapshot(), time.monotonic()
        prev, then = self._prev or (None, now)
        self._prev = (snap, now)
        lines = render_frame(snap, prev, now - then)
        outcomes = collections.Counter(e.outcome for e in self._k.audit())
        parts = ", ".join(f"{o} {n}" for o, n in sorted(outcomes.items())) or "none yet"
        lines[-1] = f"tools: {outcomes.total()} sandboxed calls ({parts})"  # for "none called"
        progress = cast("dict[str, Any]", self._tracker.ask("progress").result(5))
        lines.append(f"review: {progress['files_done']} files done, "
                     f"{progress['events']} events on review.#")  # fmt: skip
        return lines

    def _snapshot(self) -> dict[str, Any]:
        """What ``astra top`` reads of an astrad, read here from the kernel's control block."""
        control, workers = self._k._control, []
        for i in range(control.workers):
            row, (client, task) = control.worker(i), control.running(i)
            workers.append({
                "id": f"w{i:02d}", "pid": row.pid, "core": row.core, "queued": row.queued,
                "tasks_done": row.tasks_done, "restarts": row.restarts, "steals": row.steals,
                "running": "-" if client < 0 else f"c{client}:t{task}", **self._usage(row.pid),
            })  # fmt: skip
        return {
            "name": "demo", "pid": self._k.supervisor_pid, "state": control.state.name.lower(),
            "uptime_s": time.monotonic() - self._t0, "clients": control.clients(),
            "workers": workers, "agents": self._k.agents(timeout=5),
        }  # fmt: skip

    def _usage(self, pid: int) -> dict[str, float | int | None]:
        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # starts the sample: the next frame has a figure
            return {"cpu_percent": proc.cpu_percent(None), "rss_bytes": proc.memory_info().rss}
        except psutil.Error:
            return {"cpu_percent": None, "rss_bytes": None}


# ---- The command line ----


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="astra demo",
        description="A code-review team of agents over a source tree, on an embedded kernel: a "
        "planner's task graph on every core, reviewers running checks in sandboxed tools, "
        "findings in memory, progress over pub/sub.",
    )
    parser.add_argument(
        "path", nargs="*", help="files or directories to review (default: Astra's own source)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N", help="default: one per core"
    )
    parser.add_argument("--top", action="store_true", help="show the live view while it runs")
    parser.add_argument(
        "--llm-url",
        metavar="URL",
        help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: an "
        "offline, rule-based reviewer)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def default_roots() -> list[str]:
    """Astra's own source: the installed ``astra``, ``kernel``, ``ipc`` and ``sandbox``."""
    import ipc
    import kernel
    import sandbox

    files = [__file__] + [str(m.__file__) for m in (kernel, ipc, sandbox)]
    return [str(pathlib.Path(f).resolve().parent) for f in files]


def main(argv: list[str] | None = None) -> int:
    """``astra demo [PATH...] [--workers N] [--top] [--llm-url URL] [--json]``; returns
    the exit status (``EXIT_USAGE`` for a path that is missing or holds no Python file)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    roots = args.path or default_roots()
    missing = [p for p in roots if not os.path.exists(p)]
    if missing:
        print(f"astra demo: no such file or directory: {missing[0]}", file=sys.stderr)
        return EXIT_USAGE
    echo = None if args.json else sys.stdout
    if echo is not None:
        print("astra demo: a code-review team of agents on an embedded kernel", file=echo)
        print(f"reviewing {', '.join(roots)}", file=echo, flush=True)
    summary = run_demo(roots, workers=args.workers, llm_url=args.llm_url, top=args.top, echo=echo)
    if summary is None:
        print(f"astra demo: no Python files in {', '.join(roots)}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(summary, indent=2) if args.json else "\n".join(format_summary(summary)))
    return EXIT_OK


def format_summary(s: dict[str, Any]) -> list[str]:
    """The summary, for people."""
    kinds = ", ".join(f"{k} {n}" for k, n in s["findings_by_kind"].items()) or "none"
    outcomes = ", ".join(f"{k} {n}" for k, n in s["tool_outcomes"].items()) or "none"
    worst = ", ".join(f"{c['path']}:{c['function']} ({c['complexity']})"
                      for c in s["most_complex"][:3])  # fmt: skip
    spread = ", ".join(f"{w} {n}" for w, n in s["tasks_by_worker"].items())
    lines = [
        "",
        f"files {s['files']:,}   lines {s['lines']:,} (code {s['code']:,}, comments "
        f"{s['comments']:,}, blank {s['blank']:,})   functions {s['functions']:,}   "
        f"classes {s['classes']:,}",
        f"doctests {s['doctests']} found, {s['doctests_run']} run, {s['doctests_failed']} "
        f"failed   syntax errors {s['syntax_errors']}",
        f"findings {s['findings']}: {kinds}",
        f"most complex: {worst or '-'}",
        f"tasks {s['tasks']} ({spread}; {s['steals']} stolen)   agents {s['agents']}   "
        f"events {s['events']}",
        f"tool calls {s['tool_calls']} ({outcomes})   LLM calls {s['llm_calls']} ({s['llm']})",
    ]
    comments = list(s["review_comments"].items())[:3]
    if comments:
        lines += ["review comments (the first 3):", *(f"  {p}: {c}" for p, c in comments)]
    lines.append(f"elapsed {s['elapsed_s']:.1f} s on {s['workers']} workers; the kernel "
                 "stopped and removed its shared memory")  # fmt: skip
    return lines
