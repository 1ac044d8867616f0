"""Agent classes for the agent tests: importable by workers (shipped by reference)."""

from __future__ import annotations

import asyncio
import os

import astra


class Counter(astra.Agent):
    def __init__(self, start=0):
        self.n = start
        self.seen = []

    def add(self, k):
        self.n += k
        self.seen.append(k)
        return self.n

    def value(self):
        return self.n

    def history(self):
        return list(self.seen)

    def fail(self, msg):
        raise ValueError(msg)

    def pid(self):
        return os.getpid()


class Sleeper(astra.Agent):
    async def nap(self, s):
        await asyncio.sleep(s)
        return s


class Relay(astra.Agent):
    """Asks another agent from inside a handler."""

    def __init__(self, target):
        self.target = target

    async def via(self, k):
        return await self.ask(self.target, "add", k)


class Listener(astra.Agent):
    subscriptions = ("papers.*",)

    def __init__(self):
        self.got = []

    def on_message(self, topic, msg):
        self.got.append((topic, msg))

    def received(self):
        return list(self.got)


class Boom(astra.Agent):
    def __init__(self):
        self.calls = 0

    def hit(self):
        self.calls += 1
        return self.calls

    def explode(self):
        raise RuntimeError("boom")


class Slow(astra.Agent):
    async def block(self, s):
        """Busy for ``s`` seconds (one message at a time) without holding the loop."""
        await asyncio.sleep(s)
        return s


class Keeper(astra.Agent):
    """Keeps the arrays it is given (views into the arena, zero copy)."""

    def __init__(self):
        self.arrays = []

    def keep(self, arr):
        self.arrays.append(arr)
        return float(arr.sum()), bool(arr.flags.writeable)

    def total(self):
        return float(sum(a.sum() for a in self.arrays))

    def drop(self):
        self.arrays.clear()


class Big(astra.Agent):
    def blob(self, n):
        """An answer of ``n`` bytes."""
        return b"y" * n
