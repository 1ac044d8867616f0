"""The hot-path metrics (kernel/kmetrics.py): task counters and the duration histogram, agents
by state, mailbox depth, messages and ring depths, parsed with prometheus-client's parser
from an embedded kernel's scrape while work runs."""

from __future__ import annotations

import os
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import astra
from astra.errors import CapabilityError
from kernel.kmetrics import AGENT_SAMPLE_S, render_kernel_metrics
from tests.astra.agents import Counter, Sleeper
from tests.astra.tasks import boom, sleep, square
from tests.helpers import wait_until

pytestmark = pytest.mark.multiprocess


class ToolUser(astra.Agent):
    async def run(self) -> object:
        return await self.tool("python", "print(1)")


def _scrape(k: astra.Kernel) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = render_kernel_metrics(k._control)
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _total(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_task_counters_and_the_duration_histogram_count_what_ran() -> None:
    with astra.Kernel(workers=2) as k:
        before = _scrape(k)
        assert _total(before, "astra_task_duration_seconds_count") == 0
        assert k.map(square, range(40)) == [x * x for x in range(40)]
        bad = [k.submit(boom, str(i)) for i in range(3)]
        for f in bad:
            with pytest.raises(ValueError, match=r"^[012]$"):
                f.result()

        def counted() -> bool:
            s = _scrape(k)
            return (
                _total(s, "astra_tasks_started_total") >= 43
                and _total(s, "astra_task_duration_seconds_count") >= 43
            )

        wait_until(counted)
        after = _scrape(k)
        assert _total(after, "astra_tasks_submitted_total") == 43
        assert _total(after, "astra_tasks_started_total") == 43
        assert _total(after, "astra_tasks_failed_total") == 3
        assert _total(after, "astra_task_duration_seconds_count") == 43
        le_inf = _total(after, "astra_task_duration_seconds_bucket", le="+Inf")
        assert le_inf == 43
        # every worker's inbox ring is reported, and the client's
        rings = {dict(ls)["ring"] for (n, ls) in after if n == "astra_ring_depth"}
        assert {"to_w00", "to_w01"} <= rings
        assert any(r.startswith("to_c") for r in rings)


def test_agents_by_state_mailbox_and_messages_are_sampled() -> None:
    with astra.Kernel(workers=2) as k:
        counters = [k.spawn(Counter, worker=i % 2) for i in range(4)]
        for c in counters:
            for _ in range(5):
                c.tell("add", 1)
            assert c.ask("value").result() == 5
        sleeper = k.spawn(Sleeper, worker=0)
        pending = sleeper.ask("nap", 3 * AGENT_SAMPLE_S)  # an async handler: waiting
        try:

            def sampled() -> bool:
                s = _scrape(k)
                return (
                    _total(s, "astra_agents", state="waiting") == 1
                    and _total(s, "astra_agents") == 5
                    and _total(s, "astra_agent_messages_total") >= 24
                )

            wait_until(sampled, timeout_s=5 * AGENT_SAMPLE_S)
            s = _scrape(k)
            assert _total(s, "astra_agents", state="idle") == 4
            assert _total(s, "astra_agent_mailbox_depth") == 0
        finally:
            pending.result(timeout=10)
        time.sleep(0)  # the kernel closes with every agent idle


def test_tasks_resent_after_a_worker_died_count_as_retried() -> None:
    with astra.Kernel(workers=2) as k:
        pid = k.worker_pids()[0]
        futures = [k.submit(sleep, 0.3, worker=0) for _ in range(3)]
        wait_until(lambda: _total(_scrape(k), "astra_tasks_started_total", worker="w00") >= 1)
        os.kill(pid, signal.SIGKILL)
        assert [f.result(timeout=30) for f in futures] == [0.3] * 3  # re-run elsewhere
        # those still on w00 at the kill (w01 may have stolen some): at least the running one
        assert 1 <= _total(_scrape(k), "astra_tasks_retried_total") <= 3


def test_tool_calls_are_counted_by_outcome() -> None:
    with astra.Kernel(workers=2) as k:
        k.call_tool("python", "print(6 * 7)").result(timeout=30)
        noisy = k.spawn(ToolUser, tools=[])
        with pytest.raises(CapabilityError):
            noisy.ask("run").result(timeout=30)

        def counted() -> bool:
            s = _scrape(k)
            return (
                _total(s, "astra_tool_calls_total", outcome="ok") == 1
                and _total(s, "astra_tool_calls_total", outcome="refused") == 1
            )

        wait_until(counted)
