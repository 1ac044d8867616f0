"""A code-review team in one page of Astra's public API: the shape of ``astra demo``.

A task graph measures every file across the cores, reviewer agents compile each file in a
sandboxed tool and ask an LLM (an offline stand-in here) for a comment, and a tracker
agent hears their progress over pub/sub. ``astra demo`` (astra/_demo.py) is the full
version: a planner agent, doctests and complexity checks, memory, ``--llm-url``, ``--top``.

    python examples/review_team.py [PATH]      # default: the current directory

Classes and tools defined in a script's ``__main__`` travel to the workers by value
(cloudpickle); in a package they travel by name.
"""

from __future__ import annotations

import os
import sys
from typing import Protocol

import astra


@astra.tool(profile="python", cpu_s=2, memory_mb=256, timeout_s=5)
def compile_check(source: str, filename: str) -> tuple[int, str] | None:
    """Runs in a seccomp-filtered child: no network, no exec, no files outside its workdir."""
    try:
        compile(source, filename, "exec")
    except SyntaxError as exc:
        return exc.lineno or 0, exc.msg
    return None


def measure(path: str) -> tuple[str, str, int]:
    """A task: (path, text, lines) of one file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return path, text, len(text.splitlines())


def total_lines(*measured: tuple[str, str, int]) -> int:
    """A task that depends on every ``measure`` node."""
    return sum(lines for _, _, lines in measured)


class LLM(Protocol):
    async def complete(self, prompt: str) -> str: ...


class OfflineLLM:
    """Swap in a real client (an HTTP call awaited here lets the worker serve others)."""

    async def complete(self, prompt: str) -> str:
        return "compiles; " + ("short and sweet" if prompt.count("\n") < 50 else "worth a look")


class Tracker(astra.Agent):
    subscriptions = ("review.#",)  # every topic under review.

    def __init__(self) -> None:
        self.events = 0

    def on_message(self, topic: str, msg: object) -> None:
        self.events += 1

    def count(self) -> int:
        return self.events


class Reviewer(astra.Agent):
    def __init__(self) -> None:
        self.llm: LLM = OfflineLLM()

    async def review(self, path: str, text: str) -> str:
        error = await self.tool("compile_check", text, path)  # only tools granted at spawn
        if error:
            verdict = f"syntax error at line {error[0]}"
        else:
            verdict = await self.llm.complete(text)
        self.publish("review.done", {"path": path})
        return verdict


def main(root: str) -> None:
    files = sorted(
        os.path.join(here, name)
        for here, dirs, names in os.walk(root)
        if not any(part.startswith(".") or part == "__pycache__" for part in here.split(os.sep))
        for name in names
        if name.endswith(".py")
    )
    with astra.Kernel() as k:
        k.spawn(Tracker, name="tracker")
        reviewers = [k.spawn(Reviewer, tools=["compile_check"]) for _ in range(k.workers)]
        g = astra.Graph()
        measured = [g.add(measure, path) for path in files]
        total = g.add(total_lines, *measured)
        out = k.run(g)  # every file measured in parallel, then the total
        asks = [
            reviewers[i % len(reviewers)].ask("review", path, text)
            for i, (path, text, _) in enumerate(out[node] for node in measured)
        ]
        for path, ask in zip(files, asks, strict=True):
            print(f"{os.path.relpath(path, root)}: {ask.result(timeout=60)}")
        events = k.agent("tracker").ask("count").result()
        print(f"{len(files)} files, {out[total]} lines; the tracker heard {events} events so far")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
