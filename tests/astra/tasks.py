"""Task functions for the kernel tests: importable by workers (shipped by reference)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import threading
import time

import numpy as np

_calls = 0
_flag = threading.Event()


def add(a, b):
    return a + b


def square(x):
    return x * x


def noop():
    return None


def boom(msg):
    raise ValueError(msg)


def pid():
    return os.getpid()


def sleep(s):
    time.sleep(s)
    return s


def sequence():
    """How many times this worker process has run this function (its execution order)."""
    global _calls
    _calls += 1
    return _calls


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def die_once(marker):
    """Kill this worker the first time (per marker file); succeed when re-run."""
    path = pathlib.Path(marker)
    if not path.exists():
        path.write_text("x")
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


def touch(path):
    pathlib.Path(path).write_text("ran")
    return path


def ones(n):
    return np.ones(n)


def return_lock():
    return threading.Lock()


def sleep_forever_ignoring_errors():
    while True:
        with contextlib.suppress(Exception):
            time.sleep(0.05)


class Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(a)
        self.lock = threading.Lock()


def raise_unpicklable():
    raise Unpicklable(1, 2)


async def aecho(x, delay=0.0):
    await asyncio.sleep(delay)
    return x


async def await_flag():
    """Wait (without blocking the worker) until set_flag runs on the same worker."""
    while not _flag.is_set():
        await asyncio.sleep(0.001)
    return "flag seen"


def set_flag():
    _flag.set()
    return "set"


async def asleep(s):
    await asyncio.sleep(s)
    return s


def until_cancelled(marker):
    """Run until the client cancels this task (cooperatively), then leave a mark."""
    import astra

    while not astra.cancelled():
        time.sleep(0.005)
    pathlib.Path(marker).write_text("stopped")
    return "stopped"


def sleep_pid(s):
    """Sleep ``s`` seconds; return the pid of the worker that ran it."""
    time.sleep(s)
    return os.getpid()


def record(directory, key, value, delay=0.0):
    """Count a run of ``key`` (one line per run in ``directory/key``); return ``value``."""
    if delay:
        time.sleep(delay)
    with open(os.path.join(directory, str(key)), "a") as f:
        f.write("x\n")
    return value


def total(*values):
    return sum(values)


def identity(x):
    return x


def describe(arr):
    """(sum, writeable, nbytes) of an array argument: arena views arrive read-only."""
    return float(arr.sum()), bool(arr.flags.writeable), int(arr.nbytes)
