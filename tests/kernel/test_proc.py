"""Process naming and pinning (kernel/proc.py)."""

from __future__ import annotations

import os
import pathlib

import pytest

from kernel import proc
from tests.helpers import fork_child, reap


@pytest.mark.multiprocess
def test_a_named_pinned_child_shows_in_proc(tmp_path):
    out = tmp_path / "out"

    def child():
        proc.set_name("astra-w07-and-more")
        core = proc.pin(1)
        comm = pathlib.Path("/proc/self/comm").read_text().strip()
        out.write_text(f"{comm} {core} {sorted(os.sched_getaffinity(0))}")

    assert reap(fork_child(child)) == 0
    comm, core, affinity = out.read_text().split(" ", 2)
    assert comm == "astra-w07-and-m"  # the kernel keeps 15 bytes
    allowed = sorted(os.sched_getaffinity(0))
    assert int(core) == allowed[1 % len(allowed)]
    assert affinity == str([int(core)])
