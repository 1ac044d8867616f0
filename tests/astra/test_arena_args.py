"""Large numpy arguments travel through the arena by reference (astra/_client.py
``_pack_into``, kernel/shipping.py ``dumps_refs``)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from tests.astra import tasks
from tests.helpers import wait_until

pytestmark = pytest.mark.multiprocess


def _blocks(kernel):
    return kernel._arena.statistics().blocks_used


def test_a_large_array_argument_rides_the_arena_and_is_freed_after(kernel):
    arr = np.arange(1 << 18, dtype=np.float64)  # 2 MiB
    total, writeable, nbytes = kernel.submit(tasks.describe, arr).result(timeout=10)
    assert (total, writeable, nbytes) == (float(arr.sum()), False, arr.nbytes)
    assert _blocks(kernel) == 0  # the client released its block with the reply
    small = np.arange(10.0)
    assert kernel.submit(tasks.describe, small).result(timeout=10)[1] is True  # inline copy


@pytest.mark.slow
def test_an_array_over_the_frame_limit_goes_through(kernel):
    arr = np.ones(100_000_000 // 8)  # 100 MB, past the 48 MiB inline argument limit
    out = kernel.submit(tasks.describe, arr).result(timeout=30)
    assert out == (float(arr.size), False, arr.nbytes)
    nested = kernel.submit(tasks.identity, {"k": [np.ones(1 << 18)]}).result(timeout=10)
    assert nested["k"][0].nbytes == 8 << 18  # found inside containers too
    del nested
    gc.collect()
    wait_until(lambda: _blocks(kernel) == 0, timeout_s=5)


def test_a_result_in_the_arena_feeds_a_dependent_without_a_copy(kernel):
    produced = kernel.submit(tasks.ones, 1 << 18)  # 2 MiB result: an arena view
    consumer = kernel.submit(tasks.describe, produced)
    assert consumer.result(timeout=10) == (float(1 << 18), False, 8 << 18)
    view = produced.result()
    assert _blocks(kernel) == 1  # the one block: the dependent read the producer's result
    again = kernel.submit(tasks.describe, view).result(timeout=10)
    assert again[1] is False
    assert _blocks(kernel) == 1
    del view, produced
    gc.collect()
    wait_until(lambda: _blocks(kernel) == 0, timeout_s=5)
