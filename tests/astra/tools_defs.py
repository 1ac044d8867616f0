"""Tools and agents for the tool tests (importable by workers)."""

from __future__ import annotations

import astra


@astra.tool(profile="python", cpu_s=2, memory_mb=256, timeout_s=5)
def word_count(text):
    return len(text.split())


@astra.tool(timeout_s=0.5)
def hang():
    while True:
        pass


@astra.tool(memory_mb=64)
def hog():
    return len(bytearray(512 << 20))


@astra.tool()
def crash():
    import faulthandler

    faulthandler.disable()
    faulthandler._sigsegv()  # a segmentation fault, as a buggy C extension would


class Reviewer(astra.Agent):
    def __init__(self):
        self.reviewed = 0

    async def review(self, text):
        words = await self.tool("word_count", text)
        self.reviewed += 1
        return words

    async def try_tool(self, name, *args):
        try:
            return ("ok", await self.tool(name, *args))
        except Exception as exc:  # the typed outcome, as a value
            return ("error", type(exc).__name__)

    def count(self):
        return self.reviewed
